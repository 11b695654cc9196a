"""Fixtures: one embedded broker per session, the test model trained once, a fresh `Stack` per test.

Two layers: tests/unit/ is the fast unit layer (no broker, daemon or model: `pytest -m "not integration"` runs
it in seconds); every other test starts a broker or a daemon, or trains or loads a real model, and is marked
`integration` here, by its path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.broker import EmbeddedBroker
from tests.harness import CONFIG_TEMPLATE, TEST_MODEL, Stack

UNIT_DIR = Path(__file__).parent / "unit"
HEAVY_FIXTURES = {"broker", "stack", "bootstrapped_state", "smollm2_dir"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if UNIT_DIR in Path(item.fspath).parents:
            heavy = HEAVY_FIXTURES.intersection(getattr(item, "fixturenames", ()))
            if heavy:
                raise pytest.UsageError(f"{item.nodeid} is in tests/unit/ but uses {sorted(heavy)}: move it out "
                                        "of the unit layer")
        else:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def broker():
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session")
def bootstrapped_state(tmp_path_factory) -> Path:
    """A state directory whose ledger and store already hold the test model's first version."""
    from adapters.store import ArtifactStore
    from daemon import config as config_mod
    from daemon.ledger import Ledger
    from daemon.models import ModelRegistry

    root = tmp_path_factory.mktemp("bootstrapped")
    cfg_path = root / "config.toml"
    cfg_path.write_text(CONFIG_TEMPLATE.format(bootstrap="127.0.0.1:1", group="g", prefix="p", state=root / "var",
                                               metrics_port=0, model=TEST_MODEL))
    cfg = config_mod.load(cfg_path, env={})
    ledger = Ledger(cfg.state.ledger_path)
    ModelRegistry(cfg, ArtifactStore(cfg.state.artifacts_path), ledger).ensure_bootstrapped(TEST_MODEL, progress=False)
    ledger.close()
    return root / "var"


@pytest.fixture
def stack(tmp_path, broker, bootstrapped_state):
    s = Stack(tmp_path, broker.bootstrap_servers, bootstrapped_state)
    yield s
    s.close()


def _postgres_server():
    """A PostgreSQL server on loopback (tests/postgres.py), for `with`: started, then stopped and deleted. Skips only
    when the binaries are not installed (`make test` installs them: deploy/ci/install-tools.sh)."""
    from tests.postgres import PostgresServer, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (initdb, pg_ctl): run `bash deploy/ci/install-tools.sh`")
    return PostgresServer(bin_dir)


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session."""
    with _postgres_server() as server:
        yield server


@pytest.fixture
def own_postgres():
    """A PostgreSQL server of the test's own, which it may halt and resume (the session's server stays up)."""
    with _postgres_server() as server:
        yield server


@pytest.fixture
def postgres_state(postgres, bootstrapped_state) -> str:
    """A new PostgreSQL database holding what `bootstrapped_state`'s ledger holds (the test model's first
    version, whose files stay where that state keeps them); returns its URL."""
    return postgres.database_from(bootstrapped_state)


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_location(request, tmp_path):
    """Where a fresh ledger lives, once per backend: an SQLite file, or a new database on the test server."""
    if request.param == "sqlite":
        return tmp_path / "ledger.sqlite3"
    from daemon.ledger_backends import PostgresTarget

    return PostgresTarget(request.getfixturevalue("postgres").new_database())


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted once per session from the bundled GGUF (safetensors directory)."""
    from adapters.lm import loading as lm

    return lm.cached_smollm2(tmp_path_factory.mktemp("smollm2"))

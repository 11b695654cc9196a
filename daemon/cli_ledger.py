"""`unlearnd ledger`: move a single daemon's embedded ledger onto the shared PostgreSQL that replicas use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from daemon.cli_common import ConfigOpt, JsonOpt, console, fail, load_config, print_json

ledger_app = typer.Typer(help="The ledger itself: move it to a shared database.", no_args_is_help=True)


@ledger_app.command("copy")
def ledger_copy(source: Annotated[Path, typer.Argument(help="the SQLite ledger to copy (e.g. var/ledger.sqlite3)")],
                as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Copy an embedded (SQLite) ledger into the PostgreSQL ledger the config names (`state.ledger_url`), which
    must be empty: requests, versions and adapters, forgotten ids and the audit trail. Stop the daemon that owns
    SOURCE first; the copy holds its lock, so that daemon cannot start meanwhile."""
    from daemon.ledger import Ledger
    from daemon.ledger_backends import ledger_location
    from daemon.ledger_copy import TargetNotEmpty, copy_ledger
    from daemon.state_lock import StateLock, StateLocked

    cfg = load_config(config)
    if not cfg.state.ledger_url:
        fail(f"{cfg.source} names no shared ledger: set state.ledger_url to the PostgreSQL to copy into", 2)
    if not source.is_file():
        fail(f"no ledger at {source}", 2)
    try:
        lock = StateLock(source).acquire()
    except StateLocked as exc:
        fail(str(exc))
    try:
        target_location = ledger_location(cfg.state)
        src, dst = Ledger(source), Ledger(target_location)
        try:
            counts = copy_ledger(src, dst)
        except TargetNotEmpty as exc:
            fail(f"{target_location}: {exc}; copy into a new database")
        finally:
            src.close()
            dst.close()
    finally:
        lock.release()
    if as_json:
        print_json({"source": str(source), "target": str(target_location), "copied": counts})
    else:
        console.print(f"copied {source} into {target_location}: "
                      + ", ".join(f"{n} {table}" for table, n in counts.items()))

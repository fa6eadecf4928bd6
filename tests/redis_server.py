"""A throwaway real ``redis-server`` for tests (and `bench/bench_serving.py`).

Use the fixture by importing it into a test module::

    from tests.redis_server import redis_url  # noqa: F401  (pytest fixture)

It starts one server per test session on a free loopback port, with persistence off and its
files in a temporary directory, and stops it at the end. Without the ``redis-server`` binary the
Redis tests skip, or fail under CI (the environment variable ``CI`` set), where a skip would hide
a missing install step: ``make install`` installs the Debian package when it runs as root.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

MISSING = "redis-server not installed (make install installs it as root; or apt-get install redis-server)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """``redis-server`` on ``127.0.0.1:port`` in ``workdir``, stopped by `stop` (or ``with``)."""

    def __init__(self, workdir: str | os.PathLike, binary: str = "redis-server", start_timeout_s: float = 10.0) -> None:
        self.workdir = Path(workdir)
        self.port = _free_port()
        log = self.workdir / "redis.log"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), "--logfile", str(log), "--daemonize", "no"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout_s
        while not _answers_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log.read_text()[-2000:] if log.exists() else "(no log)"
                raise RuntimeError(f"redis-server did not answer PING on port {self.port}; its log:\n{tail}")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a fresh session-wide redis-server; tests isolate themselves by key namespace."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{MISSING}; CI must install it (scripts/install.sh does, as root)", pytrace=False)
        pytest.skip(MISSING)
    with tempfile.TemporaryDirectory(prefix="derm-redis-") as workdir:
        # A port taken between _free_port() and the server's bind is retried once.
        try:
            server = RedisServer(workdir, binary)
        except RuntimeError:
            server = RedisServer(workdir, binary)
        with server:
            yield server.url

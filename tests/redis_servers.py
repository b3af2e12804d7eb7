"""Real ``redis-server`` processes for the tests (a pytest plugin, see ``tests/conftest.py``).

- ``redis_server`` (session): one Redis on a free port; ``redis_url`` is its URL.
- ``restartable_redis`` (function): a Redis of the test's own, to stop, pause and start again
  on the same port (store-down tests).
- ``redis_cluster`` (session): a 3-primary Redis Cluster made with ``redis-cli --cluster create``;
  yields its ``redis+cluster://`` URL (``redis_cluster_servers``: its three RedisServers).

The fixtures are synchronous, so they need no event loop; every wait is bounded and every
process is stopped by its pid. Nothing is persisted (``--save "" --appendonly no``).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port, wait_for_port

__all__ = ("RedisServer", "redis_cluster", "redis_cluster_servers", "redis_server", "redis_url", "restartable_redis")


def _executable(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # never a silent skip: CI must run these
        pytest.fail(f"{name} is not installed (make test installs it: apt-get install -y redis-server)")
    return path


class RedisServer:
    """One ``redis-server`` process on ``port``; ``stop()``/``start()`` keep the port."""

    def __init__(self, directory: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.directory = directory
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"redis-server on {self.port} is already running")
        command = [_executable("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.directory), *self.args]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            self._wait_until_answers(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, *, kill: bool = False) -> None:
        """Stop the process (SIGTERM, or SIGKILL: a crash) and wait for it to be gone."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)  # a paused server would not act on SIGTERM
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a black hole)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A synchronous client, for checks from the test side."""
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def _wait_until_answers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        wait_for_port(self.port, timeout=timeout)
        with self.client() as client:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server on {self.port} exited with {self.process.returncode}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.02)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis for this test alone, which it may stop (or pause) and start again on the same port."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    """Three primaries, no replicas, all 16384 slots covered (pause one only briefly: after
    ``--cluster-node-timeout`` the others mark it failed)."""
    directory = tmp_path_factory.mktemp("redis-cluster")
    nodes = []
    try:
        for _ in range(3):
            port, bus_port = free_port(), free_port()  # explicit bus port: port + 10000 may be taken or > 65535
            config = ("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf")
            timing = ("--cluster-port", str(bus_port), "--cluster-node-timeout", "3000")
            nodes.append(RedisServer(directory, *config, *timing, port=port))
            nodes[-1].start()
        create = [_executable("redis-cli"), "--cluster", "create", *(node.address for node in nodes)]
        created = subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=30
        )
        if created.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed: {created.stdout[-500:]}{created.stderr[-500:]}")
        _wait_for_cluster_ok(nodes, timeout=15)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster(redis_cluster_servers: list[RedisServer]) -> str:
    """The Cluster's ``redis+cluster://h:p,h:p,h:p`` URL."""
    return "redis+cluster://" + ",".join(node.address for node in redis_cluster_servers)


def _wait_for_cluster_ok(nodes: list[RedisServer], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending:
        with pending[0].client() as client:
            state = client.execute_command("CLUSTER INFO").get("cluster_state")  # parsed into a dict
        if state == "ok":
            pending.pop(0)
        elif time.monotonic() > deadline:
            raise TimeoutError(f"redis cluster on {pending[0].address} is {state!r}, not ok, after {timeout}s")
        else:
            time.sleep(0.05)

"""A real gateway process (``python -m gateway run``) for tests that need one whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for_port


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    port: int
    admin_port: int | None = None  # None when the config says `admin: off` or names its own port
    config: Path | None = None  # the routes.yaml it runs (tests rewrite it to see a reload)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        assert self.admin_port is not None, "started with its own admin: section"
        return f"http://127.0.0.1:{self.admin_port}"

    def memory_kib(self, field: str = "VmRSS") -> int:
        """``VmRSS`` (now) or ``VmHWM`` (peak) of the gateway process, in KiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
            raise


def gateway_command(config: Path, port: int, *extra: str) -> list[str]:
    """``python -m gateway run`` on ``config``, listening on 127.0.0.1:``port``."""
    return [
        sys.executable,
        "-m",
        "gateway",
        "run",
        "-c",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]


StartGateway = Callable[..., GatewayProcess]


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[StartGateway]:
    """``start_gateway(yaml_text, *extra_args)``: run the gateway on a free port; stopped at teardown
    by its pid. A config without an ``admin:`` section gets the admin listener on a free port too."""
    started: list[GatewayProcess] = []

    def start(text: str, *extra: str) -> GatewayProcess:
        port = free_port()
        admin_port = None
        if "admin:" not in text:
            admin_port = free_port()
            text = f"admin: {{host: 127.0.0.1, port: {admin_port}}}\n{text}"
        config = tmp_path / f"routes-{len(started)}.yaml"
        config.write_text(text)
        process = subprocess.Popen(
            gateway_command(config, port, *extra),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        gateway = GatewayProcess(process, port, admin_port, config)
        started.append(gateway)
        try:
            wait_for_port(port, timeout=15)
            if admin_port is not None:
                wait_for_port(admin_port, timeout=5)
        except TimeoutError:
            process.kill()
            _, err = process.communicate(timeout=5)
            raise AssertionError(f"gateway did not start:\n{err.decode()}") from None
        return gateway

    yield start
    for gateway in started:
        gateway.stop()
        if gateway.process.stderr is not None:
            gateway.process.stderr.close()

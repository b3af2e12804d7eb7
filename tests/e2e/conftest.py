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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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


StartGateway = Callable[[str], GatewayProcess]


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[StartGateway]:
    """``start_gateway(yaml_text)``: run the gateway on a free port; stopped at teardown by its pid."""
    started: list[GatewayProcess] = []

    def start(text: str) -> GatewayProcess:
        port = free_port()
        config = tmp_path / f"routes-{len(started)}.yaml"
        config.write_text(text)
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config), "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        gateway = GatewayProcess(process, port)
        started.append(gateway)
        try:
            wait_for_port(port, timeout=15)
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

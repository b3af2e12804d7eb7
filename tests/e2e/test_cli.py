"""The ``gateway`` command, run as a real process (DESIGN §2): check, token, run.

Every process started here is stopped by its pid in a ``finally`` or a fixture teardown,
with bounded waits; output goes to files, so a chatty process can never block on a pipe.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import psutil
import pytest

from gateway.cli import workers_count
from tests.conftest import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "cli-test-secret-0123456789abcdef0123"
PYTHON_M = (sys.executable, "-m", "gateway")


def _console_script() -> str:
    script = shutil.which("gateway", path=str(Path(sys.executable).parent))
    assert script is not None, "the `gateway` console script is not installed next to this Python"
    return script


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would pick a config or a secret for the command."""
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_CONFIG", "JWT_SECRET")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def gateway(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, command: tuple[str, ...] = PYTHON_M
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args], cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=30, check=False
    )


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def services_yaml(*names: str) -> str:
    lines = ["defaults: {auth: none}", "services:"]
    lines += [f"  {name}: {{upstreams: [http://127.0.0.1:9]}}" for name in names]
    return "\n".join(lines) + "\n"


# -- gateway check ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [pytest.param(PYTHON_M, id="python -m gateway"), pytest.param(None, id="console script")]
)
def test_check_ok_prints_the_service_count(tmp_path: Path, command: tuple[str, ...] | None) -> None:
    config = write(tmp_path / "routes.yaml", services_yaml("users", "orders"))
    result = gateway("check", "-c", str(config), command=command or (_console_script(),))
    assert (result.returncode, result.stdout, result.stderr) == (0, "ok: 2 services\n", "")


BROKEN = """\
defaults: {auth: none}
services:
  users:
    upstreams: [ftp://127.0.0.1:9001]
    timout: 5s
  orders:
    upstreams: [http://127.0.0.1:9002]
    rate_limit: {requests: 0, per: 1s}
"""


def test_check_prints_one_located_line_per_error_and_exits_1(tmp_path: Path) -> None:
    write(tmp_path / "routes.yaml", BROKEN)
    result = gateway("check", "-c", "routes.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "routes.yaml:4:17: services.users.upstreams.0: "
        "expected http://host:port or https://host:port, optionally with a path prefix",
        "routes.yaml:5:5: services.users.timout: unknown key",
        "routes.yaml:8:28: services.orders.rate_limit.requests: must be >= 1",
    ]
    assert "Traceback" not in result.stderr


def test_check_substitutes_from_the_environment(tmp_path: Path) -> None:
    write(tmp_path / "routes.yaml", "listen: {port: ${PORT}}\n" + services_yaml("users"))
    assert gateway("check", cwd=tmp_path, env=_env(PORT="8081")).stdout == "ok: 1 services\n"


# -- where the config comes from: -c, then $GATEWAY_CONFIG, then ./routes.yaml ---------------------


@pytest.fixture
def three_configs(tmp_path: Path) -> Path:
    """./routes.yaml with 1 service, env.yaml with 2, flag.yaml with 3."""
    write(tmp_path / "routes.yaml", services_yaml("a"))
    write(tmp_path / "env.yaml", services_yaml("a", "b"))
    write(tmp_path / "flag.yaml", services_yaml("a", "b", "c"))
    return tmp_path


def test_config_defaults_to_routes_yaml_in_the_working_directory(three_configs: Path) -> None:
    assert gateway("check", cwd=three_configs).stdout == "ok: 1 services\n"


def test_gateway_config_variable_beats_the_working_directory(three_configs: Path) -> None:
    env = _env(GATEWAY_CONFIG=str(three_configs / "env.yaml"))
    assert gateway("check", cwd=three_configs, env=env).stdout == "ok: 2 services\n"


def test_flag_beats_the_gateway_config_variable(three_configs: Path) -> None:
    env = _env(GATEWAY_CONFIG=str(three_configs / "env.yaml"))
    assert gateway("check", "-c", "flag.yaml", cwd=three_configs, env=env).stdout == "ok: 3 services\n"


def test_no_config_anywhere_is_a_clean_error(tmp_path: Path) -> None:
    result = gateway("check", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == "routes.yaml:1:1: cannot read: No such file or directory\n"
    assert "GATEWAY_CONFIG" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_command_prints_usage_and_exits_2() -> None:
    result = gateway()
    assert result.returncode == 2
    assert "usage: gateway" in result.stderr


def test_version() -> None:
    result = gateway("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("gateway ")


# -- gateway token --------------------------------------------------------------------------------

JWT_CONFIG = """\
jwt:
  secret: ${JWT_SECRET}
  issuer: https://auth.example
  audience: api
services:
  users: {upstreams: [http://127.0.0.1:9]}
"""


def test_token_is_an_hs256_jwt_with_sub_scope_and_exp(tmp_path: Path) -> None:
    config = write(tmp_path / "routes.yaml", JWT_CONFIG)
    before = int(time.time())
    result = gateway(
        "token", "-c", str(config), "--sub", "alice", "--scope", "users:read", "--scope", "users:write",
        env=_env(JWT_SECRET=SECRET),
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="api", issuer="https://auth.example")
    assert (claims["sub"], claims["scope"]) == ("alice", "users:read users:write")
    assert claims["exp"] - claims["iat"] == 3600
    assert before <= claims["iat"] <= int(time.time())


def test_token_ttl_and_extra_claims(tmp_path: Path) -> None:
    config = write(tmp_path / "routes.yaml", JWT_CONFIG)
    result = gateway(
        "token", "-c", str(config), "--sub", "bob", "--ttl", "5m", "--claim", "tenant=acme",
        env=_env(JWT_SECRET=SECRET),
    )  # fmt: skip
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"], audience="api")
    assert claims["exp"] - claims["iat"] == 300
    assert claims["tenant"] == "acme"
    assert "scope" not in claims


def test_token_without_a_secret_fails_cleanly(tmp_path: Path) -> None:
    config = write(tmp_path / "routes.yaml", services_yaml("users"))
    result = gateway("token", "-c", str(config), "--sub", "alice")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "gateway token: the config has no jwt.secret to sign with\n"


def test_token_with_a_bad_ttl_fails_cleanly(tmp_path: Path) -> None:
    config = write(tmp_path / "routes.yaml", JWT_CONFIG)
    result = gateway("token", "-c", str(config), "--sub", "alice", "--ttl", "soon", env=_env(JWT_SECRET=SECRET))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("gateway token: expected a duration")


def test_token_with_an_invalid_config_prints_its_errors(tmp_path: Path) -> None:
    config = write(tmp_path / "routes.yaml", JWT_CONFIG)
    result = gateway("token", "-c", str(config), "--sub", "alice")  # JWT_SECRET is not set
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(f"{config}:2:11: jwt.secret: environment variable JWT_SECRET is not set")


# -- gateway run ------------------------------------------------------------------------------------


@dataclass
class Process:
    """A started command whose output goes to files; ``stop()`` is bounded and idempotent."""

    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def stdout(self) -> str:
        return self.out.read_text()

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; stdout:\n{self.stdout}\nstderr:\n{self.stderr}")
            time.sleep(0.05)

    def terminate(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)


Start = Callable[..., Process]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """``start(*argv)``: a process with its output in files; every one is stopped at teardown by its pid."""
    started: list[Process] = []

    def run(*argv: str, env: dict[str, str] | None = None) -> Process:
        number = len(started)
        out, err = tmp_path / f"{number}.out", tmp_path / f"{number}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            popen = subprocess.Popen(argv, cwd=ROOT, env=env or _env(), stdout=stdout, stderr=stderr)
        process = Process(popen, out, err)
        started.append(process)
        return process

    yield run
    for process in reversed(started):
        process.stop()


@pytest.fixture(scope="module")
def users_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The example users service (``python -m examples.users``) on a free port, shared by this module."""
    port = free_port()
    log = tmp_path_factory.mktemp("users") / "users.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "examples.users", "--port", str(port)], cwd=ROOT, stdout=out, stderr=out
        )
    backend = Process(popen, log, log)
    try:
        wait_for_port(port)
        yield port
    finally:
        backend.stop()


@pytest.fixture
def echo_backend(start: Start) -> int:
    """The test echo backend (``/slow/{seconds}`` and friends) on a free port."""
    port = free_port()
    code = f"from aiohttp import web; from tests.backends import echo_app; web.run_app(echo_app(), port={port})"
    start(sys.executable, "-c", code)
    wait_for_port(port)
    return port


def run_config(tmp_path: Path, backend: int) -> Path:
    return write(
        tmp_path / "routes.yaml",
        f"""\
        admin: {{host: 127.0.0.1, port: {free_port()}}}
        defaults: {{auth: none}}
        services:
          users:
            upstreams: [http://127.0.0.1:{backend}]
        """,
    )


def start_gateway(start: Start, config: Path, *, command: tuple[str, ...] = PYTHON_M) -> tuple[Process, int]:
    port = free_port()
    process = start(*command, "run", "-c", str(config), "--host", "127.0.0.1", "--port", str(port))
    try:
        wait_for_port(port, timeout=15)
    except TimeoutError:
        raise AssertionError(f"the gateway did not start:\n{process.stderr}") from None
    return process, port


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_run_logs_where_it_listens_and_where_each_service_goes(
    tmp_path: Path, start: Start, users_backend: int
) -> None:
    process, port = start_gateway(start, run_config(tmp_path, users_backend))
    process.wait_for(lambda: "/api/users/" in process.stderr)
    err = process.stderr
    assert f"listening on http://127.0.0.1:{port}" in err
    assert f"/api/users/ -> http://127.0.0.1:{users_backend} (auth none)" in err
    assert "Traceback" not in err
    assert process.stdout == ""  # stdout is for the access log only


def test_run_proxies_to_the_backend(tmp_path: Path, start: Start, users_backend: int) -> None:
    _, port = start_gateway(start, run_config(tmp_path, users_backend), command=(_console_script(),))
    status, headers, body = get(port, "/api/users/users/1")
    assert status == 200
    assert json.loads(body)["name"] == "alice"
    assert headers["X-Served-By"] == f"users@{users_backend}"
    assert headers["X-Request-ID"]


def test_run_writes_one_json_access_log_line_per_request(tmp_path: Path, start: Start, users_backend: int) -> None:
    process, port = start_gateway(start, run_config(tmp_path, users_backend))
    first = get(port, "/api/users/users/1")
    second = get(port, "/api/nowhere/x")
    process.wait_for(lambda: process.stdout.count("\n") >= 2)
    lines = [json.loads(line) for line in process.stdout.splitlines()]
    assert [(line["method"], line["path"], line["service"], line["status"]) for line in lines] == [
        ("GET", "/api/users/users/1", "users", 200),
        ("GET", "/api/nowhere/x", None, 404),
    ]
    assert lines[0]["upstream"] == f"http://127.0.0.1:{users_backend}"
    assert [line["request_id"] for line in lines] == [first[1]["X-Request-ID"], second[1]["X-Request-ID"]]
    assert all(isinstance(line["duration_ms"], int | float) and line["time"] for line in lines)


def test_run_exits_0_soon_after_sigterm(tmp_path: Path, start: Start, users_backend: int) -> None:
    process, port = start_gateway(start, run_config(tmp_path, users_backend))
    assert get(port, "/api/users/health")[0] == 200
    began = time.monotonic()
    assert process.terminate(timeout=5) == 0
    assert time.monotonic() - began < 3
    assert "stopped" in process.stderr


def test_sigterm_lets_an_in_flight_request_finish(tmp_path: Path, start: Start, echo_backend: int) -> None:
    process, port = start_gateway(start, run_config(tmp_path, echo_backend))
    result: list[tuple[int, dict[str, str], bytes]] = []
    request = threading.Thread(target=lambda: result.append(get(port, "/api/users/slow/1")))
    request.start()
    try:
        process.wait_for(lambda: _connected(process.popen.pid, echo_backend))  # in flight, upstream
        process.popen.send_signal(signal.SIGTERM)
        assert process.popen.wait(timeout=5) == 0
    finally:
        request.join(timeout=10)
    assert result and result[0][0] == 200
    assert result[0][2] == b"slept 1.0\n"


def _connected(pid: int, port: int) -> bool:
    """True when process ``pid`` has a connection open to ``port`` on this host."""
    return any(c.raddr and c.raddr.port == port for c in psutil.Process(pid).net_connections(kind="tcp"))


def test_run_with_a_bad_config_exits_1_with_the_located_error(tmp_path: Path, start: Start) -> None:
    config = write(tmp_path / "routes.yaml", BROKEN)
    process = start(*PYTHON_M, "run", "-c", str(config), "--port", str(free_port()))
    assert process.popen.wait(timeout=15) == 1
    assert f"{config}:5:5: services.users.timout: unknown key" in process.stderr.splitlines()
    assert "Traceback" not in process.stderr


def test_run_on_a_busy_port_exits_1_cleanly(tmp_path: Path, start: Start, users_backend: int) -> None:
    config = run_config(tmp_path, users_backend)
    process = start(*PYTHON_M, "run", "-c", str(config), "--host", "127.0.0.1", "--port", str(users_backend))
    assert process.popen.wait(timeout=15) == 1
    assert f"gateway: cannot serve on 127.0.0.1:{users_backend}" in process.stderr
    assert "Traceback" not in process.stderr


def test_workers_auto_is_one_per_cpu_this_process_may_run_on() -> None:
    assert workers_count("auto") == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_run_with_a_bad_workers_count_exits_2_with_a_message(tmp_path: Path, users_backend: int, value: str) -> None:
    result = subprocess.run(
        [*PYTHON_M, "run", "-c", str(run_config(tmp_path, users_backend)), "--workers", value],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--workers" in result.stderr


def test_more_workers_than_usable_cpus_is_a_warning_and_still_serves(
    tmp_path: Path, start: Start, users_backend: int
) -> None:
    port = free_port()
    config = run_config(tmp_path, users_backend)
    process = start("taskset", "-c", "0", *PYTHON_M, "run", "-c", str(config), "--port", str(port), "--workers", "2")
    wait_for_port(port, timeout=15)
    process.wait_for(lambda: "2 workers on 1 usable CPU:" in process.stderr)
    assert get(port, "/api/users/health")[0] == 200

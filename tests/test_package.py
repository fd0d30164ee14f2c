"""wsapp as someone else's dependency: build the wheel, install it into a fresh virtualenv outside the
repository, and serve the README's example from there with `python -m wsapp`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.clients import connect, recv_json, recv_type, send_json
from tests.harness import ROOT, ServerProcess
from tests.rawws import RawClient


def needs_pypi(test: Callable[..., None]) -> Callable[..., None]:
    """pip fetches hatchling (to build) and the dependencies (to install) from PyPI: quick with a warm
    cache, a few minutes with a cold one."""
    return pytest.mark.network(pytest.mark.timeout(300)(test))


# Variables that would let the venv's Python import wsapp from somewhere other than its site-packages.
_NOT_INHERITED = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
_CLEAN_ENV: dict[str, str | None] = dict.fromkeys(_NOT_INHERITED)


@dataclass(frozen=True)
class Installed:
    wheel: Path
    python: Path  # the fresh virtualenv's interpreter
    package_dir: Path  # where that interpreter imports wsapp from
    tmp: Path


def run(argv: list[str], cwd: Path, timeout: float = 240) -> str:
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED and not k.startswith("WSAPP_")}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("package")
    assert not tmp.resolve().is_relative_to(ROOT), "the virtualenv must live outside the repository"
    dist = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(dist)], cwd=tmp)
    (wheel,) = dist.glob("wsapp-*.whl")
    venv = tmp / "venv"
    python = venv / "bin" / "python"
    # The test's own pip installs into the new venv (`--python`): seeding the venv with a pip of its own
    # and byte-compiling every dependency would cost more than half of this test's time.
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile",
         "--disable-pip-version-check", str(wheel)], cwd=tmp)
    where = run([str(python), "-c", "import os, wsapp; print(os.path.dirname(wsapp.__file__))"], cwd=tmp)
    return Installed(wheel, python, Path(where.strip()), tmp)


def readme_example() -> str:
    """The python block under "## Build your app on wsapp" in README.md, so the two cannot drift."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    _, heading, rest = readme.partition("\n## Build your app on wsapp\n")
    assert heading, "README.md has no '## Build your app on wsapp' section"
    section = rest.split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no python code block in README's 'Build your app on wsapp' section"
    return match.group(1)


def serve(installed: Installed, cwd: Path, *app_ref: str) -> ServerProcess:
    return ServerProcess(_CLEAN_ENV, cmd=[str(installed.python), "-m", "wsapp", *app_ref], cwd=cwd)


def http(url: str, body: object = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.read()


@needs_pypi
def test_wheel_holds_the_package_with_its_page_and_py_typed_and_nothing_else(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
    expected = {"wsapp/__init__.py", "wsapp/__main__.py", "wsapp/py.typed", "wsapp/backends/__init__.py"}
    expected |= {f"wsapp/static/{f.name}" for f in (ROOT / "static").iterdir() if f.is_file()}
    assert expected <= names
    strays = {n for n in names if not n.startswith(("wsapp/", "wsapp-"))}
    assert not strays, f"files outside the package: {sorted(strays)}"  # no tests/, bench/, docs/, static/


@needs_pypi
def test_installed_package_is_imported_from_the_venv_with_its_page(installed: Installed) -> None:
    assert installed.package_dir.is_relative_to(installed.tmp / "venv")
    assert (installed.package_dir / "py.typed").is_file()
    assert (installed.package_dir / "static" / "index.html").read_bytes() == (ROOT / "static/index.html").read_bytes()


@needs_pypi
def test_python_m_wsapp_serves_the_bundled_app_from_the_venv(installed: Installed) -> None:
    workdir = installed.tmp / "bundled"
    workdir.mkdir()
    server = serve(installed, workdir)
    try:
        status, page = http(server.http("/"))
        assert status == 200 and page == (ROOT / "static/index.html").read_bytes()
        assert http(server.http("/static/app.js"))[1] == (ROOT / "static/app.js").read_bytes()
        with closing(connect(server.ws("/echo"))) as ws:
            ws.send("from the wheel")
            assert ws.recv() == "from the wheel"
    finally:
        server.stop()


@needs_pypi
def test_readme_example_runs_from_the_venv(installed: Installed) -> None:
    appdir = installed.tmp / "myproject"
    appdir.mkdir()
    (appdir / "example.py").write_text(readme_example(), encoding="utf-8")
    server = serve(installed, appdir, "example:app")
    try:
        assert http(server.http("/hello")) == (200, b"hi")

        with closing(connect(server.ws("/shout"), cookie="user=alice")) as ws:
            ws.send("hello there")
            assert ws.recv() == "HELLO THERE"

        # authenticate refuses without the cookie: the answer to the upgrade is the 401 itself.
        with closing(RawClient(server.ws("/shout"), upgrade=False)) as raw:
            assert raw.handshake({}) == 401
            assert b"log in first" in raw.response_body

        with closing(connect(server.ws("/ws"), cookie="user=alice")) as member:
            assert recv_json(member)["type"] == "welcome"
            send_json(member, type="join", room="user:alice")
            recv_type(member, "joined")
            status, body = http(server.http("/notify/alice"), {"text": "your order shipped"})
            assert status == 200
            seq = json.loads(body)["seq"]
            message = recv_type(member, "message")
            assert (message["room"], message["seq"]) == ("user:alice", seq)
            assert message["data"] == {"text": "your order shipped"}
    finally:
        server.stop()


def test_declared_dependencies_are_the_pinned_ones_as_ranges() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    ranges = {canonicalize_name(r.name): r.specifier for r in map(Requirement, project["dependencies"])}
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    assert ranges.keys() == pins.keys()
    outside = {name: (pins[name], str(ranges[name])) for name in pins if pins[name] not in ranges[name]}
    assert not outside, f"requirements.txt pins outside pyproject.toml's ranges: {outside}"
    assert all(spec.operator != "==" for specifier in ranges.values() for spec in specifier), "ranges, not pins"

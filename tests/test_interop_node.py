"""Node's `ws` client (the reference ecosystem) against wsapp's relay, unchanged."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.clients import connect, get_json, wait_for
from tests.harness import ServerProcess

NODE_DIR = Path(__file__).resolve().parent
pytestmark = pytest.mark.node


@pytest.fixture(scope="module")
def node() -> str:
    path = shutil.which("node")
    if path is None or not (NODE_DIR / "node_modules" / "ws").is_dir():
        pytest.fail("node and tests/node_modules/ws are required: run `npm ci --prefix tests`")
    return path


def test_ws_clients_relay_both_ways(node: str, relay_server: ServerProcess) -> None:
    # `localhost`, as the seed client uses: Node must find the server whatever it resolves to.
    url = f"ws://localhost:{relay_server.port}"
    result = subprocess.run([node, "node/interop.js", url], cwd=NODE_DIR, capture_output=True, text=True,
                            timeout=30)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, report
    assert report["seen"]["textAtoB"] == "Hello, WebSocket server!"
    assert report["seen"]["binaryBtoA"] == [0, 1, 2, 254, 255]
    assert report["seen"]["unicodeBtoA"] == "héllo ✓ 🎉"
    assert report["seen"]["close"]["code"] == 1000


def test_seed_client_runs_unchanged(node: str, relay_server: ServerProcess) -> None:
    listener = connect(relay_server.ws("/"))
    wait_for(lambda: get_json(relay_server.http("/stats"))[1]["relay_clients"] >= 1, what="listener")
    env = {**os.environ, "WS_URL": f"ws://localhost:{relay_server.port}"}
    seed = subprocess.Popen([node, "node/seed_client.js"], cwd=NODE_DIR, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert seed.stdout is not None
        assert seed.stdout.readline().strip() == "Connected to the WebSocket server"
        # The seed's greeting reaches the other client as text.
        assert listener.recv() == "Hello, WebSocket server!"
        listener.send("hi seed")
        assert seed.stdout.readline().strip() == "Received: hi seed"
        listener.send_binary(b"bytes too")
        assert seed.stdout.readline().strip() == "Received: bytes too"
    finally:
        listener.close()
        seed.terminate()
        seed.wait(5)
        seed.stdout.close()  # type: ignore[union-attr]

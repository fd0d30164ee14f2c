"""The benchmark scripts still start: each parses its options from a fresh interpreter, run as the docs
run it (`.venv/bin/python bench/<script>.py`), so an import or a merge that breaks one is caught here
rather than at the next measurement."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import ROOT

SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py"))


def test_every_bench_script_is_listed() -> None:
    assert {"run.py", "scaling.py", "rooms_broker.py", "send_path.py"} <= set(SCRIPTS), SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_starts(script: str) -> None:
    done = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout

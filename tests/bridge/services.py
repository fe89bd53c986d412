"""Real services for the integration tests, each on a free loopback port, stopped afterwards.

anvil comes from npm (node_modules), mosquitto from the Debian package; neither is mocked.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.client import Chain
from contracts.errors import ChainError

REPO = Path(__file__).resolve().parents[2]

#: The environment `cli(...)` runs in: this checkout's code, whatever the venv's install points at.
CLI_ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def cli(*args: str) -> list[str]:
    """The argv of `microgrid ARGS...` from this checkout (run with `env=CLI_ENV, cwd=REPO`)."""
    return [sys.executable, "-m", "training.cli", *args]


#: The running anvil behind each URL `anvil()` yielded: the fault tests pause and resume it.
ANVIL_PROCESSES: dict[str, subprocess.Popen[bytes]] = {}

#: anvil's well-known development keys (mnemonic "test test ... junk"), accounts 0 and 1.
ANVIL_KEYS = (
    bytes.fromhex("ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"),
    bytes.fromhex("59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def anvil_binary() -> Path:
    found = sorted(REPO.glob("node_modules/@foundry-rs/anvil-*/bin/anvil"))
    if not found:
        pytest.fail("anvil is missing from node_modules: run `npm ci` (make setup does)")
    return found[0]


@contextlib.contextmanager
def anvil(port: int | None = None) -> Iterator[str]:
    """An anvil node on loopback; yields its URL."""
    port = port or free_port()
    proc = subprocess.Popen(
        [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                Chain.rpc(url, timeout=1)
                break
            except ChainError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"anvil did not start: {err[:500]}")
                time.sleep(0.1)
        ANVIL_PROCESSES[url] = proc
        yield url
    finally:
        ANVIL_PROCESSES.pop(url, None)
        proc.terminate()
        proc.wait(timeout=10)

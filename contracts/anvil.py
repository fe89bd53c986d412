"""A local anvil node (npm ``@foundry-rs/anvil``) on a free loopback port.

The JSON-RPC ledger, the benchmarks and the tests all need a throwaway node; anvil ships as a
binary inside the npm package that ``make setup`` installs, so nothing else has to be present.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from contracts.client import Chain
from contracts.errors import ChainError

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def anvil_binary(root: Path = REPO) -> Path:
    """The anvil executable inside node_modules; a clear error when `npm ci` has not run."""
    found = sorted(root.glob("node_modules/@foundry-rs/anvil-*/bin/anvil"))
    if not found:
        raise ChainError("anvil is missing from node_modules: run `npm ci` (make setup does)")
    return found[0]


@contextlib.contextmanager
def local_anvil(
    port: int | None = None, extra_args: Sequence[str] = (), start_timeout: float = 20.0
) -> Iterator[str]:
    """Run anvil on loopback for the duration of the block; yields its URL."""
    port = port or free_port()
    proc = subprocess.Popen(
        [str(anvil_binary()), "--host", "127.0.0.1", "--port", str(port), "--quiet", *extra_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                Chain.rpc(url, timeout=1)
                break
            except ChainError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise ChainError(f"anvil did not start on {url}: {err[:500]}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()

"""A local anvil node (npm ``@foundry-rs/anvil``) on a free loopback port.

The JSON-RPC ledger, the benchmarks and the tests all need a throwaway node; anvil ships as a
binary inside the npm package that ``make setup`` installs, so nothing else has to be present.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from contracts.client import Chain
from contracts.errors import ChainError

REPO = Path(__file__).resolve().parents[1]

#: anvil keeps every block's state for historic queries: the newest ones in memory, and from the
#: 500th block on it writes the oldest to disk as JSON (``InMemoryBlockStates::enforce_limits``),
#: which perf showed as ~20% of anvil's CPU a slot in a long run (5.4 against 4.4 ms a step,
#: 1500 steps). Keeping the last 16 states in memory only ends that and still answers what a
#: client asks of past blocks here: a reverted transaction replayed on its parent block
#: (`contracts.settler.SlotSender`). Snapshots (`evm_snapshot`) are not historic states: a
#: revert to one taken thousands of blocks ago still works.
HISTORY_ARGS = ("--prune-history", "16")

#: Process id of every anvil `local_anvil` runs now, by URL: what `node_cpu_seconds` reads.
_RUNNING: dict[str, int] = {}


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
        [
            str(anvil_binary()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--quiet",
            *HISTORY_ARGS,
            *extra_args,
        ],
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
        _RUNNING[url] = proc.pid
        yield url
    finally:
        _RUNNING.pop(url, None)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def node_cpu_seconds(url: str) -> float | None:
    """CPU seconds (user + system, all threads) the anvil `local_anvil` runs at `url` has used
    so far, from ``/proc``; None for any other node or where ``/proc`` is missing.

    Benchmarks report the node's CPU a step beside the wall rate: on a shared machine the wall
    rate follows the load, the CPU a step far less.
    """
    pid = _RUNNING.get(url)
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

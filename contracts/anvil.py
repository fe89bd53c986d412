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
from collections.abc import Collection, Iterator, Sequence
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


def split_cpus() -> tuple[set[int], set[int]] | None:
    """(a CPU for a local node, the others) among those this thread may run on; None with
    fewer than two, or where the OS has no CPU affinity (macOS).

    A client that writes a slot to anvil and computes on meanwhile (the `rpc` ledger) steps
    at ~max(client, node) CPU a step only if each has a CPU to itself: left to the scheduler
    on 2 vCPUs, anvil's threads, woken by the client's write, were often queued behind the
    client on its CPU, ~0.5-1.5 ms of a ~4.3 ms slot answer lost a step (docs/market.md,
    "Where the wall time goes"). Pin both sides: the node alone on its CPU let the client's
    thread land there too, and anvil's ``eth_sendTransactionSync`` then sometimes missed its
    block (30 s, "Transaction confirmation timeout").
    """
    if not hasattr(os, "sched_getaffinity"):
        return None
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        return None
    return {mine[-1]}, set(mine[:-1])


@contextlib.contextmanager
def local_anvil(
    port: int | None = None,
    extra_args: Sequence[str] = (),
    start_timeout: float = 20.0,
    cpus: Collection[int] | None = None,
) -> Iterator[str]:
    """Run anvil on loopback for the duration of the block; yields its URL.

    `cpus`: the CPUs anvil (all its threads) may run on, among this thread's own (default:
    the same as this thread's); see `split_cpus`.
    """
    port = port or free_port()
    args = [
        str(anvil_binary()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--quiet",
        *HISTORY_ARGS,
        *extra_args,
    ]
    if cpus is None:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    else:
        proc = _start_on(args, cpus)
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


@contextlib.contextmanager
def running_on(cpus: Collection[int], field: str = "cpus") -> Iterator[None]:
    """This thread on `cpus` for the block, then back on the CPUs it had (`split_cpus`); what
    it starts meanwhile inherits them. A set that is empty or not among this thread's CPUs, or
    an OS without CPU affinity, is a `ChainError` naming `field`."""
    if not hasattr(os, "sched_setaffinity"):
        raise ChainError(f"{field}: this OS has no CPU affinity; pass cpus=None")
    allowed, wanted = os.sched_getaffinity(0), set(cpus)
    if not wanted or not wanted <= allowed:
        raise ChainError(
            f"{field}: expected a non-empty subset of this process's CPUs {sorted(allowed)}, "
            f"got {sorted(wanted)}"
        )
    os.sched_setaffinity(0, wanted)
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def _start_on(args: list[str], cpus: Collection[int]) -> subprocess.Popen[bytes]:
    """Start `args` on `cpus`, set on this thread around the fork so the child inherits them
    from its first instruction (anvil starts its threads at once; no ``preexec_fn``, which is
    unsafe beside other threads such as a progress bar's)."""
    with running_on(cpus, "local_anvil cpus"):
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def node_pid(url: str) -> int | None:
    """Process id of the anvil `local_anvil` runs at `url` now; None for any other node."""
    return _RUNNING.get(url)


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

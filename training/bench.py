"""Benchmarks that print figures: the environment and the power flow against pandapower.

Speed is measured, never asserted: this machine is shared and noisy, so every figure comes with
a reference measured in the same run (the pandapower-stepped environment, `pandapower.runpp`)
and the ratio between them.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from envs import MicrogridEnv, Scenario
from envs.engine import resolve_scenario
from envs.vector_env import MicrogridVectorEnv


def _rate(fn: Callable[[], int], min_seconds: float) -> float:
    """Calls per second of `fn` (which returns how many steps it took), run >= min_seconds."""
    steps = 0
    start = time.perf_counter()
    while True:
        steps += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return steps / elapsed


def _single_rate(
    sc: Scenario, actions: np.ndarray, seconds: float
) -> tuple[float, Any, dict[str, float]]:
    """Steps/s of one env of `sc` (compiled and warmed up outside the clock), the env, and the
    CPU a step of this process and (on a local anvil) of the node, in ms."""
    from contracts.anvil import node_cpu_seconds

    env = MicrogridEnv(sc)
    env.reset(seed=0)
    env.step(actions[0])
    # A chain ledger needs seconds per few steps: time in small chunks so short runs end.
    chunk = len(actions) if sc.market.ledger == "mirror" else 1
    steps = 0

    def single() -> int:
        nonlocal steps
        for a in actions[:chunk]:
            _, _, _, trunc, _ = env.step(a)
            if trunc:
                env.reset()
        steps += chunk
        return chunk

    url = sc.market.rpc_url if sc.market.ledger == "rpc" else ""
    node0, cpu0 = node_cpu_seconds(url), time.process_time()
    rate = _rate(single, seconds)
    cpu = {"python_cpu_ms_per_step": (time.process_time() - cpu0) / steps * 1e3}
    node1 = node_cpu_seconds(url)
    if node0 is not None and node1 is not None:
        cpu["node_cpu_ms_per_step"] = (node1 - node0) / steps * 1e3
    return rate, env, cpu


def bench_env(
    scenario: Scenario | str | Path | None = None,
    grid: str | None = None,
    batch: int = 1024,
    seconds: float = 3.0,
    pandapower_steps: int = 40,
    progress: Progress | None = None,
    ledger: str | None = None,
    rpc_url: str | None = None,
    evm_engine: str | None = None,
    pin_node: bool = True,
) -> dict[str, Any]:
    """Single-env steps/s (with the market on `ledger`), batched env-steps/s and the
    pandapower-stepped env, one run. The batched env always settles on the mirror: the chain
    ledgers settle one grid each. Without `rpc_url`, the `rpc` ledger runs on a local anvil;
    `evm_engine` overrides the scenario's engine of the `evm` ledger. Beside the rates, the CPU
    a single-env step costs this process (`single_python_cpu_ms_per_step`) and, on the local
    anvil, the node (`single_node_cpu_ms_per_step`): the load moves these far less.
    With `pin_node` (and two CPUs or more) the local anvil runs on a CPU of its own and this
    thread, while the single env steps, on the others (`contracts.anvil.split_cpus`;
    `single_node_cpus` in the result).
    """
    from envs.grid.reference import PandapowerSolver  # imports pandapower: only when asked

    sc = resolve_scenario(scenario)
    if grid is not None:
        sc = sc.model_copy(update={"grid": grid, "name": grid})
    market = sc.market.model_dump()
    if ledger is not None:
        market["ledger"] = ledger
    if evm_engine is not None:
        market["evm_engine"] = evm_engine
    sc = Scenario.model_validate({**sc.model_dump(), "market": {**market, "ledger": "mirror"}})
    task = progress.add_task("bench env", total=4) if progress else None

    def advance() -> None:
        if progress and task is not None:
            progress.advance(task)

    rng = np.random.default_rng(0)
    n_act = MicrogridEnv(sc).codec.act_dim
    actions = rng.uniform(-1, 1, (256, n_act)).astype(np.float32)
    bare = sc.model_copy(update={"market": sc.market.model_copy(update={"enabled": False})})
    bare_rate, _, _ = _single_rate(bare, actions, seconds)
    advance()
    node_cpus: list[int] = []
    with contextlib.ExitStack() as stack:
        if market["ledger"] == "rpc" and rpc_url is None:
            from contracts.anvil import local_anvil, running_on, split_cpus

            split = split_cpus() if pin_node else None
            rpc_url = stack.enter_context(local_anvil(cpus=split[0] if split else None))
            if split is not None:
                # Both sides: with only anvil pinned the env's thread still landed on anvil's
                # CPU and stalled it, and anvil's eth_sendTransactionSync then sometimes missed
                # its block (a 30 s "Transaction confirmation timeout"; docs/market.md).
                node_cpus = sorted(split[0])
                stack.enter_context(running_on(split[1]))
        if rpc_url is not None:
            market["rpc_url"] = rpc_url
        chosen = Scenario.model_validate({**sc.model_dump(), "market": market})
        single_rate, env, cpu = _single_rate(chosen, actions, seconds)
    advance()

    venv = MicrogridVectorEnv(batch, sc)
    venv.reset(seed=0)
    batch_actions = rng.uniform(-1, 1, (batch, env.codec.act_dim)).astype(np.float32)
    venv.step(batch_actions)

    def batched() -> int:
        for _ in range(8):
            venv.step(batch_actions)
        return 8 * batch

    batch_rate = _rate(batched, seconds)
    advance()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_env = MicrogridEnv(sc, solver=PandapowerSolver(sc.grid))
        ref_env.reset(seed=0)
        start = time.perf_counter()
        for a in actions[:pandapower_steps]:
            ref_env.step(a)
        pp_rate = pandapower_steps / (time.perf_counter() - start)
    advance()
    return {
        "ledger": market["ledger"],
        "grid": sc.grid,
        "buses": env.params.network.n_bus,
        "prosumers": env.params.n_prosumer,
        "batch": batch,
        "single_steps_per_s": round(single_rate, 1),
        "single_steps_per_s_no_market": round(bare_rate, 1),
        "market_overhead": round(bare_rate / single_rate, 2),
        **{f"single_{key}": round(value, 3) for key, value in cpu.items()},
        **({"single_node_cpus": node_cpus} if node_cpus else {}),
        "batch_env_steps_per_s": round(batch_rate, 1),
        "pandapower_steps_per_s": round(pp_rate, 2),
        "speedup_vs_pandapower": round(single_rate / pp_rate, 1),
        "batch_speedup_vs_pandapower": round(batch_rate / pp_rate, 1),
    }


def bench_powerflow(
    grid: str = "1-LV-rural1--2-sw",
    samples: int = 200,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Accuracy and speed of `envs.powerflow.solve` against `pandapower.runpp`."""
    from envs.grid.reference import reference_points
    from envs.powerflow import solve

    task = progress.add_task(f"runpp x {samples}", total=samples) if progress else None

    def tick() -> None:
        if progress is not None and task is not None:
            progress.advance(task)

    ref = reference_points(grid, samples, seed, tick)
    network, s = ref.network, ref.s_pq
    pp_time = ref.runpp_seconds
    # Warm up outside the clock, for one row and for the whole batch: the first batched call
    # starts the solver's threads and sizes its scratch (~13 ms, 40x the batch itself).
    solve(network, s[:1])
    solve(network, s)
    start = time.perf_counter()
    singles = [solve(network, s[i : i + 1]) for i in range(samples)]
    single_time = time.perf_counter() - start
    start = time.perf_counter()
    batched = solve(network, s)
    batch_time = time.perf_counter() - start
    v_single = np.concatenate([r.v for r in singles])[:, ref.bus_rows]
    dv = float(np.abs(np.abs(v_single) - ref.vm_pu).max())
    dl = float(np.abs(batched.line_loading - ref.line_loading).max())
    return {
        "grid": grid,
        "buses": network.n_bus,
        "samples": samples,
        "converged": int(batched.converged.sum()),
        "max_abs_dv_pu": dv,
        "max_line_loading_err": dl,
        "pandapower_ms_per_flow": round(pp_time / samples * 1e3, 3),
        "fast_ms_per_flow": round(single_time / samples * 1e3, 4),
        "batched_ms_per_flow": round(batch_time / samples * 1e3, 5),
        "speedup_vs_pandapower": round(pp_time / single_time, 1),
        "batched_speedup_vs_pandapower": round(pp_time / batch_time, 1),
    }

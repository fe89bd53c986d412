"""`microgrid bench bridge`: the bridge's ingest rate and decision latency beside issue 6's targets.

The measurements are `bridge.bench` (in process) and `bridge.bench_mqtt` (through mosquitto);
this is the command's shell: a progress bar on stderr, then a table for people or one JSON
object for scripts (keys in docs/iot.md, Benchmark). Figures are printed, never asserted.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()

#: Figure -> (unit, target key, whether higher is better) for the table.
_ROWS: dict[str, tuple[str, str | None, bool]] = {
    "ingest_msg_per_s": ("msg/s", "ingest_msg_per_s", True),
    "ingest_us_per_msg": ("us", None, False),
    "generator_msg_per_s": ("msg/s", None, True),
    "bridge_cpu_us_per_msg": ("us CPU", None, False),
    "decision_latency_ms_p50": ("ms", None, False),
    "decision_latency_ms_p99": ("ms", "decision_latency_ms_p99", False),
    "decision_latency_ms_max": ("ms", None, False),
    "ingest_cpu_us_per_msg": ("us CPU", None, False),
    "decision_cpu_ms_p50": ("ms CPU", None, False),
    "decision_cpu_ms_p99": ("ms CPU", None, False),
    "commands_per_slot": ("", None, False),
}


def _table(result: dict[str, Any]) -> Table:
    table = Table(
        title=(
            f"bridge benchmark ({result['mode']}): {result['devices']} devices, "
            f"{result['slots']} slots, {result['messages']:,} messages, policy {result['policy']}"
        )
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("unit")
    table.add_column("target (issue 6)", justify="right")
    for key, (unit, target_key, higher) in _ROWS.items():
        if key not in result:  # generator and bridge CPU: --mqtt only; the others: in process only
            continue
        value = float(result[key])
        target = result["targets"].get(target_key) if target_key else None
        shown = f"{value:,.1f}" if value >= 100 else f"{value:,.3g}"
        if target is None:
            table.add_row(key, shown, unit, "")
            continue
        met = value >= target if higher else value <= target
        colour = "green" if met else "red"
        sign = ">=" if higher else "<="
        table.add_row(key, f"[{colour}]{shown}[/{colour}]", unit, f"{sign} {target:,.0f}")
    return table


def bench_bridge_cmd(
    devices: Annotated[int, typer.Option(min=6, help="Devices on the synthetic site.")] = 100,
    slots: Annotated[
        int | None,
        typer.Option(min=1, help="Slots to run (default: ~20,000 messages, 10 to 200 slots)."),
    ] = None,
    mqtt: Annotated[
        bool,
        typer.Option(
            "--mqtt",
            help="End to end: a mosquitto started here, a load generator in its own process.",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """Telemetry ingest (msg/s) through the full validation path, and decision latency from a
    slot's last telemetry to its encoded commands, in process through the bridge's sans-I/O core
    with pre-signed payloads (no broker), or with --mqtt end to end through a local mosquitto
    (docs/iot.md, Benchmark, says what each includes)."""
    from bridge.bench import BenchConfig, bench_bridge, steps
    from bridge.bench_mqtt import bench_bridge_mqtt
    from bridge.errors import BridgeError

    config = BenchConfig(devices=devices, slots=slots)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    try:
        with progress:
            task = progress.add_task("sign, then ingest", total=steps(config))
            run = bench_bridge_mqtt if mqtt else bench_bridge
            result = run(config, lambda n: progress.advance(task, n))
    except BridgeError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(result))
    else:
        console.print(_table(result))

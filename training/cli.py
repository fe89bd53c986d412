"""The `microgrid` command: `demo`, `bench env`, `bench powerflow`, `scenario check`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    help="Community microgrid: environment, benchmarks, training and the grid bridge.",
    no_args_is_help=True,
    add_completion=False,
)
bench_app = typer.Typer(
    help="Benchmarks that print figures (never pass/fail).", no_args_is_help=True
)
scenario_app = typer.Typer(help="Scenario files.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(scenario_app, name="scenario")
console = Console()

ScenarioOpt = Annotated[
    Path | None, typer.Option("--scenario", help="Scenario YAML (default: the built-in rural1).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _table(title: str, data: dict[str, Any]) -> Table:
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in data.items():
        table.add_row(k, f"{v:,.6g}" if isinstance(v, float) else str(v))
    return table


def _fail(err: Exception) -> None:
    console.print(f"[red]error:[/red] {err}")
    raise typer.Exit(2)


@bench_app.command("env")
def bench_env_cmd(
    scenario: ScenarioOpt = None,
    grid: Annotated[
        str | None, typer.Option(help="simbench LV grid code (overrides the scenario's).")
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Grids in the batched env.")] = 1024,
    seconds: Annotated[float, typer.Option(min=0.1, help="Seconds per timed phase.")] = 3.0,
    as_json: JsonOpt = False,
) -> None:
    """Single-env steps/s, batched env-steps/s and the same env stepped with pandapower.runpp."""
    from envs import MicrogridError
    from training.bench import bench_env

    try:
        with _progress() as progress:
            result = bench_env(scenario, grid, batch, seconds, progress=progress)
    except MicrogridError as err:
        _fail(err)
    if as_json:
        print(json.dumps(result))
    else:
        console.print(_table("environment benchmark", result))


@bench_app.command("powerflow")
def bench_powerflow_cmd(
    grid: Annotated[str, typer.Option(help="simbench LV grid code.")] = "1-LV-rural1--2-sw",
    samples: Annotated[int, typer.Option(min=1, help="Random operating points.")] = 200,
    as_json: JsonOpt = False,
) -> None:
    """Max |dV| and loading error against pandapower.runpp, and the speed-up."""
    from envs import MicrogridError
    from training.bench import bench_powerflow

    try:
        with _progress() as progress:
            result = bench_powerflow(grid, samples, progress=progress)
    except MicrogridError as err:
        _fail(err)
    if as_json:
        print(json.dumps(result))
    else:
        console.print(_table("power-flow benchmark", result))


@app.command()
def demo(
    scenario: ScenarioOpt = None,
    days: Annotated[int, typer.Option(min=1, help="Test days to average over.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Run the rule-based controller and doing-nothing over held-out test days; print KPIs."""
    from envs import MicrogridError
    from training.demo import KPI_KEYS, compare_on_test_days

    try:
        with _progress() as progress:
            result = compare_on_test_days(scenario, days, progress=progress)
    except MicrogridError as err:
        _fail(err)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"{result['grid']}: mean per test day, days {result['test_days']}")
    table.add_column("KPI")
    names = ("idle", "rule_based")
    for name in names:
        table.add_column(name, justify="right")
    for k in (*KPI_KEYS, "savings_vs_idle"):
        table.add_row(k, *(f"{result[name][k]:,.3f}" for name in names))
    console.print(table)
    console.print("Training against these baselines arrives with `microgrid train` (issue 5).")


@scenario_app.command("check")
def scenario_check(path: Annotated[Path, typer.Argument(help="Scenario YAML file.")]) -> None:
    """Validate a scenario file and build its grid; errors name the field and allowed values."""
    from envs import MicrogridError, load_scenario
    from envs.grid import build_grid

    try:
        sc = load_scenario(path)
        p = build_grid(sc)
    except MicrogridError as err:
        _fail(err)
    console.print(
        _table(
            f"scenario {sc.name}",
            {
                "grid": sc.grid,
                "buses": p.network.n_bus,
                "prosumers": p.n_prosumer,
                "batteries": p.n_battery,
                "train / validation / test days": (
                    f"{p.train_days.size} / {p.validation_days.size} / {p.test_days.size}"
                ),
                "episode steps": p.episode_steps,
                "forecast": f"{sc.forecast.mode}, {sc.forecast.horizon_steps} steps",
            },
        )
    )


if __name__ == "__main__":
    app()

"""The `microgrid` command: `demo`, `bench env`, `bench powerflow`, `scenario check`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from training.bench_bridge import bench_bridge_cmd
from training.bridge_cli import bridge_app, devices_app

app = typer.Typer(
    help="Community microgrid: environment, benchmarks, training and the grid bridge.",
    no_args_is_help=True,
    add_completion=False,
)
bench_app = typer.Typer(
    help="Benchmarks that print figures (never pass/fail).", no_args_is_help=True
)
scenario_app = typer.Typer(help="Scenario files.", no_args_is_help=True)
chain_app = typer.Typer(help="The contract suite: compile, deploy.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(chain_app, name="chain")
app.add_typer(scenario_app, name="scenario")
app.add_typer(devices_app, name="devices")
app.add_typer(bridge_app, name="bridge")
bench_app.command("bridge")(bench_bridge_cmd)
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


def _controller_table(summary: dict[str, Any]) -> Table:
    """Controllers as rows, the headline KPIs as columns."""
    table = Table(title=f"{summary['grid']}, {summary['split']} days {summary['days']}: per day")
    table.add_column("controller")
    columns = ("cost", "fraction_of_optimum", "peak_kw", "violations", "self_sufficiency")
    for col in columns:
        table.add_column(col, justify="right")
    for name, row in summary["controllers"].items():
        table.add_row(name, *(f"{row[c]:,.3f}" for c in columns))
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
    ledger: Annotated[
        str | None,
        typer.Option(
            help="Ledger of the single env: mirror, evm (in process on the scenario's "
            "market.evm_engine: revm, or py-evm) or rpc (anvil, or --rpc-url)."
        ),
    ] = None,
    rpc_url: Annotated[
        str | None, typer.Option(help="JSON-RPC node for --ledger rpc (default: a local anvil).")
    ] = None,
    evm_engine: Annotated[
        str | None,
        typer.Option(help="What runs --ledger evm: revm or py-evm (default: the scenario's)."),
    ] = None,
    pin_node: Annotated[
        bool,
        typer.Option(
            help="With --ledger rpc on the local anvil: run anvil on a CPU of its own and the "
            "env on the others (two CPUs or more)."
        ),
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Single-env steps/s (market on --ledger), batched env-steps/s (mirror) and the same env
    stepped with pandapower.runpp."""
    from contracts.errors import ChainError
    from envs import MicrogridError
    from training.bench import bench_env

    if ledger not in (None, "mirror", "evm", "rpc"):
        _fail(ValueError(f"--ledger: expected mirror, evm or rpc, got {ledger!r}"))
    if evm_engine not in (None, "revm", "py-evm"):
        _fail(ValueError(f"--evm-engine: expected revm or py-evm, got {evm_engine!r}"))
    try:
        with _progress() as progress:
            result = bench_env(
                scenario,
                grid,
                batch,
                seconds,
                progress=progress,
                ledger=ledger,
                rpc_url=rpc_url,
                evm_engine=evm_engine,
                pin_node=pin_node,
            )
    except (MicrogridError, ChainError) as err:
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


@bench_app.command("chain")
def bench_chain_cmd(as_json: JsonOpt = False) -> None:
    """Gas of the contract suite on py-evm: createOrder, settlement per matched trade (batches of
    50/200/500), signed reading, reward claim, and the largest batch one transaction settles."""
    from contracts.bench import BATCHES, bench_chain, bench_steps, summary_rows
    from contracts.errors import ChainError

    try:
        with _progress() as progress:
            task = progress.add_task("chain gas", total=bench_steps(BATCHES))
            result = bench_chain(BATCHES, lambda _: progress.advance(task))
    except ChainError as err:
        _fail(err)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title="contract gas (py-evm)")
    table.add_column("figure")
    table.add_column("gas", justify="right")
    for name, value in summary_rows(result):
        table.add_row(name, value)
    console.print(table)


@bench_app.command("coap")
def bench_coap_cmd(
    devices: Annotated[int, typer.Option(min=1, help="CoAP devices behind one port.")] = 14,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds: telemetry burst + commands.")] = 50,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plain CoAP instead of OSCORE (what OSCORE costs).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """What CoAP adds: each round every device notifies telemetry, then gets a command; reading
    latency (notification to the bridge's queue) and command round trip (POST to DACK), the
    simulator's aiocoap server and the bridge's CoapLink on loopback, under OSCORE unless
    --insecure (docs/iot.md, CoAP)."""
    from bridge.bench_coap import bench_coap

    result = bench_coap(devices, rounds, insecure=insecure)
    if as_json:
        print(json.dumps(result))
        return
    console.print(_table(f"CoAP transport, {devices} devices x {rounds} rounds", result))


@app.command()
def demo(
    timesteps: Annotated[int, typer.Option(min=0, help="PPO steps (0: baselines only).")] = 120_000,
    n_days: Annotated[int, typer.Option(min=1, help="Test days to evaluate on.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """A short PPO run on the default scenario, then the agent against every baseline."""
    from training.config import EvalConfig, TrainConfig
    from training.evaluate import evaluate as run_evaluation
    from training.train import tracking_uri
    from training.train import train as run_training

    model = None
    with _progress() as progress:
        if timesteps > 0:
            cfg = TrainConfig(
                timesteps=timesteps,
                n_envs=32,
                hyperparameters={"n_steps": 96, "batch_size": 1024, "n_epochs": 5},
                policy_kwargs={"net_arch": [128, 128], "log_std_init": -1.0},
                eval=EvalConfig(every_steps=max(timesteps // 3, 1), days=4),
                registered_model="microgrid-demo",
            )
            result = run_training(cfg, progress=progress)
            model = str(result.onnx_path)
        summary = run_evaluation(model, None, "test", n_days, True, True, progress)
    if as_json:
        print(json.dumps(summary["controllers"]))
        return
    console.print(_controller_table(summary))
    console.print(
        f"Runs, plots and the registered model: .venv/bin/mlflow ui --backend-store-uri "
        f"{tracking_uri()}  (then open http://127.0.0.1:5000)"
    )


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Training YAML, e.g. configs/train/ppo.yaml.")],
    timesteps: Annotated[int | None, typer.Option(help="Override the config's timesteps.")] = None,
    scenario: ScenarioOpt = None,
    seed: Annotated[int | None, typer.Option(help="Override the config's seed.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train an SB3 agent, track it in MLflow, export ONNX, register it (alias `champion`)."""
    from envs import MicrogridError
    from training.config import load_train_config
    from training.train import tracking_uri
    from training.train import train as run_training

    try:
        cfg = load_train_config(
            config,
            timesteps=timesteps,
            seed=seed,
            scenario=str(scenario) if scenario else None,
        )
        with _progress() as progress:
            result = run_training(cfg, progress=progress)
    except MicrogridError as err:
        _fail(err)
    summary = {
        "run_id": result.run_id,
        "model_uri": result.model_uri,
        "val_cost": result.val_cost,
        "champion": result.champion,
        "onnx": str(result.onnx_path),
        "tracking_uri": tracking_uri(),
    }
    if as_json:
        print(json.dumps(summary))
        return
    console.print(_table("training run", summary))
    console.print(f"Open the MLflow UI: .venv/bin/mlflow ui --backend-store-uri {tracking_uri()}")


@app.command()
def evaluate(
    model: Annotated[
        str | None,
        typer.Option(help="models:/NAME@ALIAS, models:/NAME/VERSION or an .onnx file."),
    ] = None,
    scenario: ScenarioOpt = None,
    days: Annotated[str, typer.Option(help="Split to evaluate on: test or validation.")] = "test",
    n_days: Annotated[int, typer.Option(min=1, help="How many days of the split.")] = 5,
    mpc: Annotated[bool, typer.Option(help="Include the MPC baseline (~1.5 s per day).")] = True,
    mlflow_log: Annotated[
        bool, typer.Option("--mlflow/--no-mlflow", help="Log plots and KPIs.")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """The agent and every baseline on held-out days: cost, peak, violations, share of optimum."""
    from envs import MicrogridError
    from training.evaluate import REPORTED
    from training.evaluate import evaluate as run_evaluation

    if days not in ("test", "validation"):
        _fail(ValueError(f"--days must be 'test' or 'validation', got {days!r}"))
    try:
        with _progress() as progress:
            result = run_evaluation(model, scenario, days, n_days, mpc, mlflow_log, progress)
    except (MicrogridError, FileNotFoundError) as err:
        _fail(err)
    if as_json:
        print(json.dumps(result["controllers"]))
        return
    console.print(_controller_table(result))
    console.print(f"All KPIs: --json ({', '.join(REPORTED)}, total_cost, ...).")


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="Base training YAML.")],
    trials: Annotated[int, typer.Option(min=1, help="Trials this process runs.")] = 10,
    timesteps: Annotated[int | None, typer.Option(help="Override timesteps per trial.")] = None,
    study: Annotated[str, typer.Option(help="Study name (shared by every joining machine).")] = (
        "microgrid"
    ),
    storage: Annotated[
        str, typer.Option(help="Optuna storage URL; postgresql://... to share across machines.")
    ] = "sqlite:///optuna.db",
    as_json: JsonOpt = False,
) -> None:
    """Optuna search; run the same command on many machines against one database to scale out."""
    from envs import MicrogridError
    from training.config import load_train_config
    from training.sweep import sweep as run_sweep

    try:
        base = load_train_config(config, timesteps=timesteps)
        with _progress() as progress:
            result = run_sweep(base, trials, study, storage, progress)
    except MicrogridError as err:
        _fail(err)
    best = result.best_trial
    summary = {
        "study": study,
        "trials": len(result.trials),
        "best_val_cost": best.value,
        "best_params": best.params,
        "best_model_uri": best.user_attrs.get("model_uri"),
    }
    if as_json:
        print(json.dumps(summary))
    else:
        console.print(_table(f"sweep {study}", {k: str(v) for k, v in summary.items()}))


@chain_app.command("compile")
def chain_compile(
    out: Annotated[
        Path | None, typer.Option(help="Artifact directory (default contracts/build).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompile contracts/src with the pinned solc-js (same as `make contracts`)."""
    from contracts.compile import BUILD_DIR, compile_all
    from contracts.errors import ChainError

    try:
        written = compile_all(out or BUILD_DIR)
    except ChainError as err:
        _fail(err)
    if as_json:
        print(json.dumps({k: str(v) for k, v in sorted(written.items())}))
        return
    console.print(_table("compiled artifacts", {k: str(v) for k, v in sorted(written.items())}))


#: The contracts keep timestamps and durations in uint64.
_U64 = 2**64 - 1


@chain_app.command("deploy")
def chain_deploy(
    rpc: Annotated[
        str | None, typer.Option(help="JSON-RPC URL (e.g. anvil); default: in-process py-evm.")
    ] = None,
    manifest: Annotated[Path, typer.Option(help="Where to write the manifest.")] = Path(
        "deployment.json"
    ),
    governance: Annotated[bool, typer.Option(help="Also deploy Governor + Timelock.")] = True,
    genesis: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=_U64,
            help="Start of slot 0 in Unix seconds, at or before the chain's clock "
            "(default: the chain's last UTC midnight, so slot s lies in hour (s % 96) // 4).",
            show_default=False,
        ),
    ] = None,
    reading_window_seconds: Annotated[
        int,
        typer.Option(
            min=1,
            max=_U64,
            help="Seconds after a slot's end during which its meter readings are accepted.",
        ),
    ] = 600,
    renewable_rate_per_wh: Annotated[
        int,
        typer.Option(min=0, help="Reward-token base units granted per renewable Wh."),
    ] = 10**14,
    fund_rewards: Annotated[
        int,
        typer.Option(
            min=0,
            help="Reward tokens (base units) to mint to the admin and put in RewardSystem's "
            "budget; 0 leaves it empty (no rewards can be granted until someone funds it).",
        ),
    ] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Deploy the suite with its roles wired and write the manifest the bridge reads (with the
    genesis, the parameters and the reward funding it was deployed with)."""
    from contracts.client import (
        Chain,
        SuiteConfig,
        deploy_governance,
        deploy_suite,
        deployment_manifest,
    )
    from contracts.errors import ChainError

    config = SuiteConfig(
        reading_window_seconds=reading_window_seconds, renewable_rate_per_wh=renewable_rate_per_wh
    )
    try:
        chain = Chain.rpc(rpc) if rpc else Chain.in_process()
        now = chain.timestamp()
        if genesis is not None and genesis > now:
            _fail(
                ValueError(
                    f"--genesis: expected a time at or before the chain's clock ({now}), "
                    f"got {genesis} (the contracts refuse a slot 0 in the future)"
                )
            )
        suite = deploy_suite(chain, genesis=genesis, config=config)
        if fund_rewards:
            suite.fund_rewards(fund_rewards)
        gov = deploy_governance(suite) if governance else None
        data = {**deployment_manifest(suite, gov), "rewardsFunded": fund_rewards}
    except (ChainError, ConnectionError, OSError) as err:
        _fail(err)
    manifest.write_text(json.dumps(data, indent=2, sort_keys=True))
    if as_json:
        print(json.dumps(data))
        return
    console.print(_table(f"deployed to chain {data['chainId']}", dict(data["addresses"])))
    console.print(f"genesis: {data['genesis']}  parameters: {data['parameters']}")
    console.print(f"manifest: {manifest}")


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

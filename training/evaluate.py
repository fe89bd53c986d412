"""`microgrid evaluate`: the agent beside every baseline on held-out days.

Each controller runs the same days of the chosen split (test by default: days that training never
sees). The headline figure is the fraction of the perfect-foresight optimum's savings,
(cost_idle - cost_x) / (cost_idle - cost_optimum): 1 is the best any controller can do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from rich.progress import Progress

from agents import Policy, all_baselines
from envs import MicrogridEnv, Scenario
from training import plots
from training.evaluation import EpisodeTrace, mean_kpis, run_day

#: KPIs reported per controller (means per day), besides the savings fractions.
REPORTED = (
    "cost",
    "peak_kw",
    "violations",
    "self_sufficiency",
    "import_kwh",
    "export_kwh",
    "losses_kwh",
    "degradation_cost",
    "discomfort_cost",
    "reward",
)


def evaluate(
    model: str | None = None,
    scenario: Scenario | str | Path | None = None,
    split: str = "test",
    n_days: int = 5,
    include_mpc: bool = True,
    log_to_mlflow: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Mean KPIs per controller over the first `n_days` days of `split`."""
    env = MicrogridEnv(scenario, split=split)
    days = [int(d) for d in env.params.days(split)[:n_days]]
    controllers: list[Policy] = all_baselines(env, include_mpc)
    if model is not None:
        from training.train import load_registered_onnx

        controllers.append(load_registered_onnx(model))
    task = progress.add_task("evaluating", total=len(days) * len(controllers)) if progress else None
    results: dict[str, Any] = {}
    traces: dict[str, EpisodeTrace] = {}
    for controller in controllers:
        day_traces = []
        for i, day in enumerate(days):
            day_traces.append(run_day(env, controller.predict, day, trace=i == 0))
            if progress and task is not None:
                progress.advance(task)
        traces[controller.name] = day_traces[0]
        kpis = mean_kpis(day_traces)
        kpis["total_cost"] = kpis["cost"] + kpis["degradation_cost"] + kpis["discomfort_cost"]
        results[controller.name] = {k: kpis[k] for k in (*REPORTED, "total_cost")}
    idle, best = results["idle"], results["optimum"]
    for row in results.values():
        for key, field in (
            ("fraction_of_optimum", "cost"),
            ("fraction_of_optimum_total", "total_cost"),
        ):
            gap = idle[field] - best[field]
            row[key] = (idle[field] - row[field]) / gap if abs(gap) > 1e-9 else 0.0
    summary = {"grid": env.params.grid_code, "split": split, "days": days, "controllers": results}
    if log_to_mlflow:
        from training.train import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        mlflow.set_experiment("microgrid-evaluation")
        with mlflow.start_run(run_name=f"evaluate {model or 'baselines'}"):
            mlflow.log_params({"model": model or "", "split": split, "days": str(days)})
            for name, row in results.items():
                mlflow.log_metrics({f"{name}.{k}": float(v) for k, v in row.items()})
            for name, trace in traces.items():
                mlflow.log_figure(plots.day_profile(trace, name), f"day_{name}.png")
    return summary

"""Figures people would rather look at than read: learning curves, a day's flows, SoC, prices."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: training runs headless
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from training.evaluation import EpisodeTrace


def learning_curve(steps: Sequence[int], values: Sequence[float], label: str) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(list(steps), list(values), marker="o")
    ax.set_xlabel("environment steps")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def day_profile(trace: EpisodeTrace, title: str) -> Figure:
    """Energy flows (kWh per 15 min), mean SoC and the community price over one day."""
    s = trace.series
    hours = [k / 4 for k in range(len(s["import_kwh"]))]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    for key in ("load_kwh", "pv_kwh", "import_kwh", "export_kwh", "charge_kwh", "discharge_kwh"):
        axes[0].plot(hours, s[key], label=key.removesuffix("_kwh"))
    axes[0].set_ylabel("kWh per slot")
    axes[0].legend(ncol=3, fontsize=8)
    axes[1].plot(hours, s["mean_soc"], color="tab:green")
    axes[1].set_ylabel("mean SoC")
    axes[1].set_ylim(0, 1)
    axes[2].plot(hours, s["community_price"], color="tab:red")
    axes[2].set_ylabel("price / kWh")
    axes[2].set_xlabel("hour of day")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} — day {trace.day}")
    fig.tight_layout()
    return fig

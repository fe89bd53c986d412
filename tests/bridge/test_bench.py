"""`microgrid bench bridge` at a tiny size: the JSON has its documented keys and sane figures.

The figures themselves are printed by the bench, never asserted: this machine's load decides them.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from training.cli import app

KEYS = {
    "mode", "devices", "prosumers", "slots", "messages", "signed_share", "ingest_msg_per_s",
    "ingest_us_per_msg", "decision_latency_ms_p50", "decision_latency_ms_p99",
    "decision_latency_ms_max", "commands_per_slot", "policy", "targets",
}  # fmt: skip


@pytest.mark.parametrize("mode", ["in_process", "mqtt"])
def test_bench_bridge_json_has_positive_finite_figures(mode: str) -> None:
    args = ["bench", "bridge", "--devices", "20", "--slots", "10", "--json"]
    result = CliRunner().invoke(app, args + (["--mqtt"] if mode == "mqtt" else []))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data.keys() >= KEYS and data["mode"] == mode
    assert data["devices"] == 20 and data["slots"] == 10 and data["messages"] == 200
    for key in ("ingest_msg_per_s", "decision_latency_ms_p50", "decision_latency_ms_p99"):
        assert math.isfinite(data[key]) and data[key] > 0, key
    assert data["decision_latency_ms_p50"] <= data["decision_latency_ms_p99"]
    assert data["commands_per_slot"] > 0 and data["targets"]["decision_latency_ms_p99"] == 20.0
    if mode == "mqtt":
        assert math.isfinite(data["bridge_cpu_us_per_msg"]) and data["bridge_cpu_us_per_msg"] > 0


def test_bench_bridge_table() -> None:
    result = CliRunner().invoke(app, ["bench", "bridge", "--devices", "6", "--slots", "3"])
    assert result.exit_code == 0, result.output
    assert "ingest_msg_per_s" in result.stdout and "5,000" in result.stdout

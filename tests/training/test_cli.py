"""The `microgrid` command: help everywhere, JSON for scripts, clear errors, real work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from contracts.anvil import split_cpus
from training.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "args",
    [[], ["bench"], ["bench", "env"], ["bench", "powerflow"], ["train"], ["evaluate"],
     ["sweep"], ["demo"], ["chain"], ["chain", "deploy"], ["chain", "compile"],
     ["scenario", "check"]],
)  # fmt: skip
def test_every_command_has_help(args: list[str]) -> None:
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_bench_env_json_has_the_documented_keys() -> None:
    result = runner.invoke(app, ["bench", "env", "--batch", "8", "--seconds", "0.2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("single_steps_per_s", "batch_env_steps_per_s", "pandapower_steps_per_s",
                "speedup_vs_pandapower"):  # fmt: skip
        assert data[key] > 0
    assert data["speedup_vs_pandapower"] == pytest.approx(
        data["single_steps_per_s"] / data["pandapower_steps_per_s"], rel=0.01
    )
    assert data["single_python_cpu_ms_per_step"] > 0
    assert "single_node_cpu_ms_per_step" not in data  # the mirror runs no node


def test_bench_powerflow_json_reports_accuracy() -> None:
    result = runner.invoke(app, ["bench", "powerflow", "--samples", "5", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["max_abs_dv_pu"] <= 1e-6
    assert data["max_line_loading_err"] <= 1e-4
    assert data["speedup_vs_pandapower"] > 1


def test_chain_deploy_writes_a_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "deployment.json"
    result = runner.invoke(app, ["chain", "deploy", "--manifest", str(manifest), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(manifest.read_text())
    assert {"EnergyTrading", "GridBalance", "DeviceRegistry", "RewardSystem"} <= set(
        data["addresses"]
    )
    assert isinstance(data["chainId"], int)


def test_chain_deploy_defaults_are_the_suites_and_the_manifest_records_them(
    tmp_path: Path,
) -> None:
    """Without options the command deploys `SuiteConfig()` from the chain's last UTC midnight;
    the manifest says so (the CLI spells the defaults out for `--help`, this keeps them the
    suite's own)."""
    from contracts.client import SuiteConfig

    manifest = tmp_path / "deployment.json"
    result = runner.invoke(app, ["chain", "deploy", "--no-governance", "--manifest", str(manifest)])
    assert result.exit_code == 0, result.output
    data = json.loads(manifest.read_text())
    cfg = SuiteConfig()
    assert data["parameters"]["readingWindowSeconds"] == cfg.reading_window_seconds
    assert data["parameters"]["renewableRatePerWh"] == cfg.renewable_rate_per_wh
    assert data["genesis"] % 86_400 == 0 and data["rewardsFunded"] == 0
    help_text = runner.invoke(app, ["chain", "deploy", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--genesis", "--reading-window-seconds", "--renewable-rate-per-wh",
                   "--fund-rewards"):  # fmt: skip
        assert option in help_text


def test_chain_deploy_refuses_bad_options_naming_them(tmp_path: Path) -> None:
    manifest = tmp_path / "deployment.json"
    base = ["chain", "deploy", "--no-governance", "--manifest", str(manifest)]
    for extra, named in (
        (["--reading-window-seconds", "0"], "--reading-window-seconds"),
        (["--genesis", "-1"], "--genesis"),
        (["--fund-rewards", "-5"], "--fund-rewards"),
        (["--renewable-rate-per-wh", "x"], "--renewable-rate-per-wh"),
        (["--genesis", str(2**40)], "--genesis: expected a time at or before the chain's clock"),
    ):
        result = runner.invoke(app, [*base, *extra], env={"COLUMNS": "200"})
        assert result.exit_code == 2, (extra, result.output)
        assert named in " ".join(result.output.split()), (extra, result.output)
    assert not manifest.exists()


def test_bad_scenario_exits_2_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("forecast:\n  mode: psychic\n")
    result = runner.invoke(app, ["scenario", "check", str(bad)])
    assert result.exit_code == 2
    assert "forecast.mode" in result.output


@pytest.mark.skipif(split_cpus() is None, reason="CPU affinity needs Linux and two CPUs")
def test_bench_env_rpc_runs_the_local_anvil_on_a_cpu_of_its_own() -> None:
    """`bench env --ledger rpc` (`pin_node`, the CLI's default --pin-node) runs anvil on the
    last CPU and the env's thread on the others while it steps, reports the node's CPU, then
    gives this thread its CPUs back."""
    from training.bench import bench_env

    before = os.sched_getaffinity(0)
    data = bench_env(batch=4, seconds=0.2, pandapower_steps=1, ledger="rpc")
    assert data["single_node_cpus"] == [max(before)]
    assert data["single_steps_per_s"] > 0 and data["single_node_cpu_ms_per_step"] > 0
    assert os.sched_getaffinity(0) == before

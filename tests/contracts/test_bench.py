"""`microgrid bench chain` on tiny batches: the documented keys and figures that make sense."""

from __future__ import annotations

import json

from contracts.bench import bench_chain, bench_steps, summary_rows
from contracts.client import TX_GAS_CAP


def test_bench_chain_reports_the_documented_figures() -> None:
    ticks: list[str] = []
    result = bench_chain((2, 6), ticks.append)
    assert list(result)[:5] == [
        "gas_create_order",
        "gas_per_trade",
        "gas_signed_reading",
        "gas_reward_claim",
        "max_trades_per_tx",
    ]
    assert len(ticks) == bench_steps((2, 6))
    json.dumps(result)  # --json prints it as is
    per_trade = result["gas_per_trade"]
    assert set(per_trade) == {"2", "6"}
    assert per_trade["6"] < per_trade["2"]  # the transaction base spreads over more trades
    detail = result["detail"]
    for n in ("2", "6"):  # the worst case reads cancellation bits and credits fresh sellers
        assert detail["settle_gas"]["worst"][n] > detail["settle_gas"]["repeat"][n]
        assert detail["reconcile_gas"]["worst"][n] > detail["reconcile_gas"]["repeat"][n]
    line = detail["worst_settle_line"]
    assert line["base"] + line["per_trade"] * detail["trades_fitting_cap"] <= TX_GAS_CAP
    assert result["max_trades_per_tx"] == min(detail["trades_fitting_cap"], 500)
    assert 50_000 < result["gas_create_order"] < 200_000
    # The reading nonce lives in the device's record, written at registration: a device's first
    # reading writes no fresh storage slot more than its later ones (calldata aside).
    assert 50_000 < result["gas_signed_reading"] < 120_000
    assert abs(result["gas_signed_reading"] - detail["first_reading_gas"]) < 1_000
    assert 30_000 < result["gas_reward_claim"] < 200_000
    assert any("max_trades_per_tx" in name for name, _ in summary_rows(result))

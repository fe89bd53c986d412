"""The compiled kernel equals the numpy reference model (`envs.dynamics`) step for step.

Both solve the power flow to the same tolerance (~1e-9 pu) along slightly different iterates, so
figures agree to ~1e-8 relative, not bit for bit; the tolerance below leaves room for that only.
"""

from __future__ import annotations

import numpy as np
import pytest

from envs import Scenario
from envs.codec import Codec
from envs.dynamics import GridState, observe, reset_state, step
from envs.grid import build_grid
from envs.kernel import (
    CompiledParams,
    field_starts,
    observe_kernel,
    outcome_from_matrix,
    step_kernel,
)
from envs.kpis import OUTCOME_FIELDS


@pytest.mark.parametrize("mode", ["noisy", "perfect", "persistence"])
def test_kernel_matches_reference_over_two_days(mode: str) -> None:
    scenario = Scenario(forecast={"mode": mode, "horizon_steps": 6})
    p = build_grid(scenario)
    codec = Codec.from_params(p)
    compiled = CompiledParams(p)
    starts = field_starts(codec.field_sizes())
    rng = np.random.default_rng(11)
    b = 3
    days = p.train_days[[0, 7, 20]]
    offsets = rng.integers(0, 1 << 20, b)
    ref = reset_state(p, days, None, offsets)
    fast = reset_state(p, days, None, offsets)
    for k in range(2 * 96 - 1):
        if k == 96:  # second day: new episode rows continue from the same state arrays
            ref = reset_state(p, days + 1, ref.soc, offsets)
            fast = reset_state(p, days + 1, fast.soc, offsets)
        obs_ref = codec.encode(observe(p, ref), b)
        obs_fast = observe_kernel(compiled, p, fast, starts, codec.scaling())
        np.testing.assert_allclose(obs_fast, obs_ref, rtol=1e-5, atol=1e-6)
        a = codec.decode_action(rng.uniform(-1.1, 1.1, (b, codec.act_dim)))
        ref, out_ref = step(p, ref, a)
        matrix, _ = step_kernel(
            compiled, p, fast, a.battery_kw, a.pv_curtailment, a.dr_share, a.price_multiplier
        )
        out_fast = outcome_from_matrix(matrix)
        for name in OUTCOME_FIELDS:
            np.testing.assert_allclose(
                np.asarray(getattr(out_fast, name), dtype=float),
                np.asarray(getattr(out_ref, name), dtype=float),
                rtol=1e-6,
                atol=1e-6,
                err_msg=f"{name} differs at step {k}",
            )
        for name in GridState.__dataclass_fields__:
            np.testing.assert_allclose(
                getattr(fast, name), getattr(ref, name), rtol=1e-6, atol=1e-8, err_msg=name
            )
        assert np.array_equal(fast.slot, ref.slot) and np.array_equal(fast.step, ref.step)


@pytest.mark.parametrize("mode", ["noisy", "perfect", "persistence"])
def test_observation_kernel_equals_the_codecs_encoding_exactly(mode: str) -> None:
    """Same state in, same float32 bits out: the kernel's one-pass encoding of every field
    (forecasts included) is `Codec.encode(observe(...))`, not an approximation of it.
    Only the sin/cos phase features may differ in the last bit (numpy's sin vs libm's)."""
    p = build_grid(Scenario(forecast={"mode": mode}))
    codec = Codec.from_params(p)
    compiled = CompiledParams(p)
    starts = field_starts(codec.field_sizes())
    rng = np.random.default_rng(3)
    b = 5
    days = p.train_days[rng.integers(0, p.train_days.shape[0], b)]
    state = reset_state(p, days, None, rng.integers(0, 1 << 20, b))
    for k in range(40):
        a = codec.decode_action(rng.uniform(-1, 1, (b, codec.act_dim)))
        state, _ = step(p, state, a)
        if k % 13 == 0 or k == 39:
            fast = observe_kernel(compiled, p, state, starts, codec.scaling())
            ref = codec.encode(observe(p, state), b)
            phase = int(starts[2])  # time_of_day and day_of_year come first
            np.testing.assert_array_equal(fast[:, phase:], ref[:, phase:])
            np.testing.assert_allclose(fast[:, :phase], ref[:, :phase], rtol=0, atol=1e-6)

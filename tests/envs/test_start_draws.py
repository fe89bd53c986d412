"""`start_draws` draws what two `Generator.integers` calls a generator draw, and leaves every
generator where those calls leave it (every later draw the same), over several resets in a
row."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from gymnasium.utils import seeding

from envs.forecast import NOISE_TABLE_SIZE
from envs.start_draws import start_draws


def _effective(rng: np.random.Generator) -> dict[str, object]:
    """The generator's state as far as any later draw can tell: a kept half's value
    (`uinteger`) means nothing while none is kept, and `integers` leaves its last one there."""
    state = _plain(rng.bit_generator.state)
    if not state.get("has_uint32", 0):
        state.pop("uinteger", None)
    return state


def _plain(x: object) -> Any:
    """A state with its arrays as lists (Philox keeps arrays), comparable with ==."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x.tolist() if isinstance(x, np.ndarray) else x


def _one_by_one(rngs: list[np.random.Generator], n: int) -> tuple[list[int], list[int]]:
    pairs = [(int(r.integers(0, n)), int(r.integers(NOISE_TABLE_SIZE))) for r in rngs]
    return [a for a, _ in pairs], [b for _, b in pairs]


@pytest.mark.parametrize(
    "n",
    [
        2,
        217,  # a split's days
        (1 << 31) + 1,  # half of all 32-bit outputs rejected: the exact path, kept halves
        (1 << 32) - 1,
    ],
)
def test_same_draws_and_states_as_integers(n: int) -> None:
    seeds = list(range(600))
    fast = [seeding.np_random(s)[0] for s in seeds]
    slow = [seeding.np_random(s)[0] for s in seeds]
    buffered = np.zeros(len(seeds), dtype=bool)
    for _ in range(4):  # consecutive resets: a kept half carries over
        first, second = start_draws(fast, n, buffered)
        want_first, want_second = _one_by_one(slow, n)
        assert first.tolist() == want_first
        assert second.tolist() == want_second
        for f, s in zip(fast, slow, strict=True):
            assert _effective(f) == _effective(s)
    assert [f.random() for f in fast] == [s.random() for s in slow]
    if n == (1 << 31) + 1:
        assert buffered.any()  # the exact path ran and left halves kept


def test_a_subset_of_rows_and_other_bit_generators() -> None:
    fast = [np.random.Generator(np.random.Philox(s)) for s in range(20)]
    fast += [seeding.np_random(s)[0] for s in range(20)]
    slow = [np.random.Generator(np.random.Philox(s)) for s in range(20)]
    slow += [seeding.np_random(s)[0] for s in range(20)]
    buffered = np.zeros(40, dtype=bool)
    rows = np.arange(5, 35)
    sub = buffered[rows]
    first, second = start_draws([fast[i] for i in rows], 96, sub)
    want = _one_by_one([slow[i] for i in rows], 96)
    assert (first.tolist(), second.tolist()) == want
    for f, s in zip(fast, slow, strict=True):
        assert _effective(f) == _effective(s)
        assert f.integers(1 << 40) == s.integers(1 << 40)


@pytest.mark.parametrize("n", [0, 1, 1 << 32])
def test_rejects_ranges_outside_32_bits(n: int) -> None:
    with pytest.raises(ValueError, match="n must be in"):
        start_draws([seeding.np_random(0)[0]], n, np.zeros(1, dtype=bool))

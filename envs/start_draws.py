"""The draws that start episodes, for many generators at once, exactly as one by one.

An episode starts with two draws from its environment's own generator, in this order:
`integers(0, n)` (the index of its day among the split's n days) then
`integers(NOISE_TABLE_SIZE)` (its forecast-noise offset). The vector environment resets a
thousand grids together, and two `Generator.integers` calls a grid were ~4 ms a reset of 1,024
grids, Python argument handling all but a sliver of it.

Both ranges fit in 32 bits, where numpy draws by Lemire's method on 32-bit outputs: with `r` the
next 32-bit output and `m = r * n`, the draw is `m >> 32` unless the low half of `m` is below
`(2**32 - n) % n`, in which case `r` is rejected and the next output tried. PCG64 makes two
32-bit outputs of each 64-bit one, the low half first; the high half is kept for the next call
(`has_uint32`). A generator keeping no half therefore draws its day from the low half of its next
64-bit output and its offset from the high half, and keeps none afterwards. `start_draws` takes
that one 64-bit output a generator (`random_raw`) and does Lemire's arithmetic on all of them
with numpy. A rejection (odds below n / 2**32 a draw) steps that generator back one output and
lets `integers` draw for it: every generator ends where the one-by-one calls leave it, so a
batched environment keeps drawing what N single ones draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from envs.forecast import NOISE_TABLE_SIZE

_U32 = 1 << 32
#: One step back for `PCG64.advance`, which counts modulo its 128-bit period.
_BACK_ONE = (1 << 128) - 1


def start_draws(
    rngs: Sequence[np.random.Generator], n: int, buffered: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(`integers(0, n)`, `integers(NOISE_TABLE_SIZE)`) of each generator, drawn in that order.

    `buffered[i]` says whether generator i may keep a 32-bit half (one that went through the
    exact path, below, and does): those draw by `integers`, and `buffered` is updated in place.
    Fresh generators (`gymnasium.utils.seeding.np_random`) keep none.
    """
    b = len(rngs)
    first = np.empty(b, dtype=np.int64)
    second = np.empty(b, dtype=np.int64)
    if b == 0:
        return first, second
    if not 1 < n < _U32 or NOISE_TABLE_SIZE >= _U32:
        raise ValueError(f"start_draws: n must be in (1, 2**32), got {n}")
    gens = [r.bit_generator for r in rngs]
    fast = ~np.asarray(buffered, dtype=bool)
    fast &= np.fromiter((type(g) is np.random.PCG64 for g in gens), dtype=bool, count=b)
    rows = np.flatnonzero(fast)
    raws = np.fromiter((gens[i].random_raw() for i in rows.tolist()), dtype=np.uint64)
    m_day = (raws & np.uint64(_U32 - 1)) * np.uint64(n)
    m_off = (raws >> np.uint64(32)) * np.uint64(NOISE_TABLE_SIZE)
    low = np.uint64(_U32 - 1)
    rejected = (m_day & low) < np.uint64((_U32 - n) % n)
    rejected |= (m_off & low) < np.uint64((_U32 - NOISE_TABLE_SIZE) % NOISE_TABLE_SIZE)
    first[rows] = (m_day >> np.uint64(32)).astype(np.int64)
    second[rows] = (m_off >> np.uint64(32)).astype(np.int64)
    for i in rows[rejected].tolist():
        gens[i].advance(_BACK_ONE)  # also clears the kept half, which there was none of
        fast[i] = False
    for i in np.flatnonzero(~fast).tolist():
        first[i] = rngs[i].integers(0, n)
        second[i] = rngs[i].integers(NOISE_TABLE_SIZE)
        state = gens[i].state
        buffered[i] = bool(state.get("has_uint32", 1))
    return first, second

"""Keep the garbage collector out of a slot's decision.

A bridge holds a large heap that lives as long as the process: the site manifest, one validator
and key per device, the codec, the policy, the command templates. CPython's cyclic collector
walks every tracked object on each full collection, and with 1,000 devices that walk costs
about 10 ms. It lands inside whichever call allocated last, and within a slot that is usually
the decision, which must publish its commands within 20 ms of the last reading. Measured on
`bridge.bench`'s 1,000-device site (decision alone, 2026-11-27, load ~1): p50 12.2-12.8 ms and
p99 18.8-20.3 ms as CPython ships, 8.3 ms and 12.3-13.9 ms after `settle_heap`.

`settle_heap` collects once, moves what survives (the start-up heap) into the permanent
generation that collections skip, and makes the young generations collect less often. The
collector stays on: cycles made while serving are still freed. The start-up objects live until
the process exits anyway, so freezing them holds no memory that would otherwise be freed.

Call it once, in the process that serves (the CLI's `bridge run`, the `--mqtt` bench's bridge),
after start-up and before the first slot. The in-process bench calls it too, so its latency
includes the collections a live bridge pays.
"""

from __future__ import annotations

import gc

#: (young, middle, old) collection thresholds while serving. CPython ships (700, 10, 10): with
#: ~3,000 allocations a slot per 1,000 devices, that is several young collections a slot, and a
#: full one every few slots.
SERVING_THRESHOLDS = (20_000, 50, 100)


def settle_heap() -> None:
    """Freeze the start-up heap and space collections out (see the module's docstring)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_THRESHOLDS)

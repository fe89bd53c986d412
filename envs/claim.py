"""Atomic counters compiled code can take work from: `claim(counter, i)` adds one to
`counter[i]` and returns the value before.

The batched step shares its chunks of rows out to threads. Handing each chunk over from Python
costs one numba dispatch (~10-20 us with the GIL held, ~66 arguments unboxed) per chunk; with
this counter each thread enters the compiled step once and takes chunks itself until none are
left, so the chunks can be small (a thread that loses its core holds up less of the step)
without paying a dispatch each.
"""

from __future__ import annotations

from typing import Any

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def claim(typingctx: Any, counter: Any, index: Any) -> Any:
    """`counter[index] += 1` as one atomic read-modify-write (sequentially consistent); returns
    the value before. `counter` is a C-contiguous 1-d int64 array; `index` is not checked."""
    if not (
        isinstance(counter, types.Array)
        and counter.dtype == types.int64
        and counter.ndim == 1
        and counter.layout == "C"
        and isinstance(index, types.Integer)
    ):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ary = context.make_array(counter)(context, builder, args[0])
        i = context.cast(builder, args[1], index, types.intp)
        ptr = cgutils.get_item_pointer(context, builder, counter, ary, [i])
        one = context.get_constant(types.int64, 1)
        return builder.atomic_rmw("add", ptr, one, "seq_cst")

    return types.int64(counter, index), codegen

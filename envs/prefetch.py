"""A software prefetch compiled code can issue: `prefetch(array, index)` asks the CPU to bring
the cache line of element `index` of a C-contiguous array towards L1, without waiting for it.

The batched step reads, for every row, a few kilobytes at a place of its own: the row's stretch
of the forecast-noise table (7 KB a step, at the row's drawn offset) and its window of the
profiles (the row's slot). The hardware prefetcher only follows a stream once a few misses have
shown it, so each row started with a run of cache misses; asking for the next row's lines while
the current row computes hides most of them. A prefetch never faults and changes no value, so
the results stay bit for bit what they were.
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def prefetch(typingctx: Any, array: Any, index: Any) -> Any:
    """Prefetch (for reading, kept in every cache level) the line holding element `index` of
    `array`, counted over its flat C order. The index is not checked: a prefetch out of range
    is harmless (it never faults), only wasted."""
    if not (
        isinstance(array, types.Array) and array.layout == "C" and isinstance(index, types.Integer)
    ):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        ary = context.make_array(array)(context, builder, args[0])
        i = context.cast(builder, args[1], index, types.intp)
        # One declaration per module: cast every element type's pointer to the one it takes.
        ptr = builder.bitcast(builder.gep(ary.data, [i]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # (address, read, locality 3 = keep in every level, data cache)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen

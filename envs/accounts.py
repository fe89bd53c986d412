"""The prosumers' chain identities: deterministic keys, addresses and the batch order.

Signed order batches list orders sorted by owner address, and that order decides how marginal
fills are rounded, so every ledger must clear books in it: the mirror as well as the chain. The
keys are derived from the prosumer's index, which makes a simulated community the same on every
machine and every run (these keys sign simulated orders only; never fund them on a real chain).
"""

from __future__ import annotations

import functools

import numpy as np
from eth_utils import keccak

from envs.params import IntArray


def prosumer_key(index: int) -> bytes:
    """The private key that signs prosumer `index`'s orders."""
    return keccak(b"microgrid prosumer" + index.to_bytes(4, "big"))


def meter_key(index: int) -> bytes:
    """The private key of prosumer `index`'s smart meter (signs its readings)."""
    return keccak(b"microgrid meter" + index.to_bytes(4, "big"))


@functools.cache
def prosumer_addresses(n: int) -> tuple[str, ...]:
    """The prosumers' account addresses (eth_account loads only when an env needs them)."""
    from eth_account import Account

    return tuple(Account.from_key(prosumer_key(k)).address for k in range(n))


@functools.cache
def batch_order(n: int) -> IntArray:
    """Prosumer indices sorted by account address: the order of a signed batch."""
    addresses = prosumer_addresses(n)
    order = sorted(range(n), key=lambda k: int(addresses[k], 16))
    return np.array(order, dtype=np.int64)

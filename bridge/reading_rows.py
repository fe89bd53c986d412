"""A meter's readings reach the chain in the order it signed them, whatever the outbox's retries.

Why: DeviceRegistry takes a device's readings only in nonce order (``_useCheckedNonce``, checked
before anything else), and the outbox retries each row on its own backoff. A reading that met a
"not yet" (``DeviceRegistrySlotNotEnded``: the device's clock a little ahead of the chain's, a node
away for minutes) sits out a longer backoff than the device's next reading, which then goes first
and is refused (``InvalidAccountNonce``) for good. Worse, the first one lands later and every
reading after it carries a nonce one too far: each is refused in turn, and the meter is lost to
the chain from then on. So a reading refused for its nonce while an earlier reading of the same
device is still owed (pending or signed in the outbox) waits for it (the outbox's `WAIT`); with
none owed, the refusal is final, as before (the nonce is then really wrong).
"""

from __future__ import annotations

from typing import Any, Literal

from bridge.outbox import WAIT, Outbox, Repair
from contracts.errors import ContractRevert

#: The prefix of a reading row's key: ``reading:<device>:<slot>``.
READING = "reading:"


def earlier_owed(outbox: Outbox, key: str, args: list[Any]) -> bool:
    """Whether a reading of the same device with a lower nonce than the row `key` (its stored
    `args`: ((device, slot, Wh, nonce), signature)) is still pending or signed."""
    device = key.removeprefix(READING).rsplit(":", 1)[0]
    nonce = int(args[0][3])
    return any(int(other[0][3]) < nonce for other in outbox.unfinished_args(f"{READING}{device}:"))


def reading_repair(outbox: Outbox, slot_rows: Repair | None = None) -> Repair:
    """The outbox's repair hook: reading rows wait for the device's earlier readings
    (`earlier_owed`); slot rows go to `slot_rows` (the market's, `SlotSettlement.repairer`)."""

    def repair(
        key: str, err: ContractRevert, args: list[Any]
    ) -> tuple[Any, str] | Literal["wait"] | None:
        if key.startswith(READING):
            if err.name == "InvalidAccountNonce" and earlier_owed(outbox, key, args):
                return WAIT
            return None
        return None if slot_rows is None else slot_rows(key, err, args)

    return repair

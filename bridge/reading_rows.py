"""A meter's reading that never reaches the chain costs that reading only, and is counted by why.

Why: DeviceRegistry takes any reading nonce above the device's last used one (gaps allowed) for
a slot after the device's last. Under the old exact-nonce rule one reading lost for good (its
window closed while the node was away, its slot's totals evicted from the registry's 32-slot
ring, lost by the device) left a nonce the meter would never fill, and every later reading of
it was refused: the meter was lost to the chain. This module used to make a later reading wait
for an earlier one owed; now nothing has to wait on the chain's side, and the bridge keeps the
order itself:

* The validator refuses a reading whose nonce is not above the last one it accepted from the
  device (`bridge.validation`, counted ``replayed``), so a meter's rows enter the outbox in
  nonce (and slot) order: a reading of slot n arriving after the meter's reading of n + 1 was
  accepted is refused there, as the chain would refuse it (it cannot go back).
* The outbox's lane (``reading:<device>:``) signs them in that order: a later reading waits
  while an earlier one sits out a "not yet" (slot not ended) backoff.
* A row that fails for good leaves the lane, and the next reading lands over the gap.

What is left is one reading per failure, and the operator sees it: `lost_readings` counts the
failed reading rows by the error that failed them (``bridge_readings_lost_total{error}``,
``readings_lost`` in the summary) and `log_lost` logs each one with a word on what it means.
A reading can still be lost to a later one of its meter: were it mined reverted after the
later one was already sent (a revert its pre-flight did not see), the later one lands first and
it is refused for its nonce (``DeviceRegistryNonceTooLow``) when signed again: counted, final.
"""

from __future__ import annotations

import logging

from bridge.outbox import Outbox

#: The prefix of a reading row's key: ``reading:<device>:<slot>``.
READING = "reading:"

log = logging.getLogger("bridge.readings")

#: What each error that fails a reading row for good says about the lost reading.
LOST_WHY = {
    "DeviceRegistryReadingTooLate": "its slot's reading window closed before it was mined",
    "DeviceRegistryNonceTooLow": "a later reading of the meter landed first",
    "DeviceRegistrySlotNotAfterLast": "a reading of the meter for this or a later slot landed",
    "DeviceRegistrySlotTotalsEvicted": "its slot's totals gave way to a slot 32 later",
    "DeviceRegistryInvalidSignature": "the meter's signature does not recover to its key",
    "DeviceRegistryCapacityExceeded": "more energy than the meter's rated capacity allows",
    "DeviceRegistryInactiveDevice": "the meter is deactivated",
    "DeviceRegistryUnknownDevice": "the meter is not registered",
}


def lost_readings(outbox: Outbox) -> dict[str, int]:
    """Reading rows failed for good, by the error that failed them."""
    return outbox.failures(READING)


def log_lost(key: str, error: str) -> None:
    """The outbox's ``on_failed`` hook: a failed reading row is logged as a lost reading (the
    meter's later readings go on), any other row as a failed row."""
    if key.startswith(READING):
        device, _, slot = key.removeprefix(READING).rpartition(":")
        log.warning(
            "reading lost",
            extra={"device": device, "slot": slot, "error": error, "why": LOST_WHY.get(error, "")},
        )
    else:
        log.warning("outbox row failed", extra={"key": key, "error": error})

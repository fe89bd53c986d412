"""Payload factories for the bridge tests: well-formed, signed device messages to mutate."""

from __future__ import annotations

from typing import Any

from bridge.bench import SAMPLE_METRICS
from bridge.messages import DeviceBirth, Ratings, encode
from bridge.signing import ReadingDomain
from bridge.site import SiteManifest

SEED = "test"
CHAIN_ID = 31337
REGISTRY = "0x" + "5a" * 20
GENESIS = 1_700_000_000 - 1_700_000_000 % 86_400
#: A fixed "now" 100 s into slot 1000 after genesis.
NOW_MS = (GENESIS + 1000 * 900 + 100) * 1000
SLOT = 999
"""The slot that just ended at NOW_MS."""


def birth(site: SiteManifest, device: str, bd_seq: int = 1, ts: int = NOW_MS) -> bytes:
    d = site.device(device)
    assert d is not None
    return encode(
        DeviceBirth(
            device=device,
            kind=d.kind,
            address=d.address,
            bd_seq=bd_seq,
            seq=0,
            ts=ts,
            ratings=Ratings(capacity_w=d.capacity_w, power_kw=d.power_kw or None),
        )
    )


def metrics_for(kind: str) -> dict[str, Any]:
    return dict(SAMPLE_METRICS[kind])


def telemetry(
    site: SiteManifest,
    domain: ReadingDomain,
    key: bytes,
    device: str,
    *,
    seq: int = 1,
    bd_seq: int = 1,
    ts: int = NOW_MS,
    slot: int = SLOT,
    nonce: int = 0,
    metrics: dict[str, Any] | None = None,
    energy_wh: int | None = None,
    signer: bytes | None = None,
) -> dict[str, Any]:
    """A valid DDATA as a dict (meters and batteries carry a signed reading)."""
    d = site.device(device)
    assert d is not None
    m = metrics or metrics_for(d.kind.value)
    msg: dict[str, Any] = {
        "device": device,
        "bd_seq": bd_seq,
        "seq": seq,
        "ts": ts,
        "slot": slot,
        "metrics": m,
    }
    if d.kind.value in ("meter", "battery"):
        wh = energy_wh if energy_wh is not None else round(m.get("net_kw", 0.0) * 250)
        sig = domain.sign(signer or key, slot, wh, nonce)
        msg["reading"] = {
            "slot": slot,
            "energy_wh": wh,
            "nonce": nonce,
            "signature": "0x" + sig.hex(),
        }
    return msg

"""Hypothesis fuzzing of the validator: malformed, mutated, forged and replayed device messages.

Properties, for every input: the validator never raises; it accepts or refuses with exactly one
counted reason; a refused message moves no session state (the genuine next message is still
accepted); nothing forged, tampered with or replayed is ever accepted.

The default run tries ~2,400 payloads; `--runslow` (or BRIDGE_FUZZ_EXAMPLES=N for each test)
tries >= 12,000, the issue's ">= 10,000 fuzzed payloads".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.messages import Telemetry
from bridge.signing import ReadingDomain
from bridge.site import SiteManifest
from bridge.site_builder import device_key
from bridge.validation import Rejected, TelemetryValidator, ValidationLimits
from tests.bridge.conftest import tiny_params
from tests.bridge.helpers import CHAIN_ID, GENESIS, NOW_MS, REGISTRY, SEED, birth, telemetry

DEFAULT = int(os.environ.get("BRIDGE_FUZZ_EXAMPLES", "600"))
SLOW = max(DEFAULT, 3_000)

# Module-level objects: hypothesis calls the body many times and fixtures are per test.
from bridge.site_builder import build_site  # noqa: E402

SITE: SiteManifest = build_site(tiny_params(), site="site1", seed=SEED)
DOMAIN = ReadingDomain(CHAIN_ID, REGISTRY)
DEVICES = [d.id for d in SITE.devices]
KEYS = {d: device_key(SEED, d) for d in DEVICES}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def _fresh() -> TelemetryValidator:
    v = TelemetryValidator(SITE, DOMAIN, ValidationLimits(genesis=GENESIS))
    for d in DEVICES:
        v.on_birth(d, birth(SITE, d), NOW_MS)
    return v


def _refused_without_side_effects(v: TelemetryValidator, device: str, payload: bytes) -> None:
    before = sum(v.rejected.values())
    out = v.on_telemetry(device, payload, NOW_MS)
    assert isinstance(out, Rejected), f"accepted a bad payload: {payload[:200]!r}"
    assert sum(v.rejected.values()) == before + 1
    good = telemetry(SITE, DOMAIN, KEYS[device], device)
    assert isinstance(v.on_telemetry(device, json.dumps(good).encode(), NOW_MS), Telemetry)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


# ---- bodies ------------------------------------------------------------------------------


def malformed(device: str, payload: bytes | Any) -> None:
    """Random bytes, or random JSON, are refused."""
    v = _fresh()
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    _refused_without_side_effects(v, device, raw)


def mutated(device: str, choice: int, value: Any) -> None:
    """One field of a valid message replaced by a random JSON value: accepted only if the
    result is still a well-formed, plausible, correctly signed message of this device."""
    v = _fresh()
    msg = telemetry(SITE, DOMAIN, KEYS[device], device)
    original = json.loads(json.dumps(msg))
    paths = _paths(msg)
    path = paths[choice % len(paths)]
    _set(msg, path, value)
    payload = json.dumps(msg).encode()
    out = v.on_telemetry(device, payload, NOW_MS)
    if isinstance(out, Telemetry):
        # Only a mutation the validator can prove harmless may pass: untouched identity,
        # session and signed reading, and values inside the schema.
        assert out.device == device and out.bd_seq == 1 and out.seq >= 1
        if device.endswith("-meter"):
            assert out.reading is not None  # a meter's reading is never optional
        if out.reading is not None:  # other kinds may drop theirs, never alter it
            assert json.loads(out.reading.model_dump_json()) == original["reading"]
    elif out.relay is not None:
        # Off time or out of session, so not acted on, validly signed: only the untouched
        # reading may go to the chain.
        assert out.reason.value in ("stale", "future", "no_session", "implausible")
        assert out.relay.reading is not None
        assert json.loads(out.relay.reading.model_dump_json()) == original["reading"]
    else:
        good = telemetry(SITE, DOMAIN, KEYS[device], device)
        assert isinstance(v.on_telemetry(device, json.dumps(good).encode(), NOW_MS), Telemetry)


def forged(device_index: int, signer_index: int, energy: int, nonce: int, junk: bytes) -> None:
    """Readings signed by the wrong key, or carrying a junk signature, are refused."""
    meters = [d for d in DEVICES if d.endswith("-meter")]
    device = meters[device_index % len(meters)]
    signer = DEVICES[signer_index % len(DEVICES)]
    v = _fresh()
    msg = telemetry(SITE, DOMAIN, KEYS[device], device, nonce=nonce, energy_wh=300)
    if signer == device:  # junk bytes instead of a wrong key
        msg["reading"]["signature"] = "0x" + junk.hex()
    else:
        sig = DOMAIN.sign(KEYS[signer], msg["slot"], 300, nonce)
        msg["reading"]["signature"] = "0x" + sig.hex()
    msg["reading"]["energy_wh"] = 300 + energy * (signer == device and energy != 0)
    _refused_without_side_effects(v, device, json.dumps(msg).encode())


def replayed(device_index: int, count: int, pick: int) -> None:
    """After `count` genuine messages, any one of them sent again is refused."""
    device = DEVICES[device_index % len(DEVICES)]
    v = _fresh()
    sent = []
    for i in range(count):
        msg = json.dumps(telemetry(SITE, DOMAIN, KEYS[device], device, seq=i + 1, nonce=i))
        assert isinstance(v.on_telemetry(device, msg.encode(), NOW_MS), Telemetry)
        sent.append(msg.encode())
    before = sum(v.rejected.values())
    out = v.on_telemetry(device, sent[pick % count], NOW_MS)
    assert isinstance(out, Rejected) and out.reason.value == "replayed"
    assert sum(v.rejected.values()) == before + 1


STRATEGIES: dict[str, tuple[Callable[..., None], dict[str, Any]]] = {
    "malformed": (
        malformed,
        {
            "device": st.sampled_from(DEVICES),
            "payload": st.binary(max_size=300) | json_values,
        },
    ),
    "mutated": (
        mutated,
        {
            "device": st.sampled_from(DEVICES),
            "choice": st.integers(0, 100),
            "value": json_values,
        },
    ),
    "forged": (
        forged,
        {
            "device_index": st.integers(0, 100),
            "signer_index": st.integers(0, 100),
            "energy": st.integers(-50, 50),
            "nonce": st.integers(0, 2**64),
            "junk": st.binary(min_size=65, max_size=65),
        },
    ),
    "replayed": (
        replayed,
        {
            "device_index": st.integers(0, 100),
            "count": st.integers(1, 4),
            "pick": st.integers(0, 100),
        },
    ),
}


def _run(name: str, examples: int) -> None:
    body, strategies = STRATEGIES[name]
    test = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )(given(**strategies)(body))
    test()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_fuzz(name: str) -> None:
    _run(name, DEFAULT)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_fuzz_long(name: str) -> None:
    _run(name, SLOW)

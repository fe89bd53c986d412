"""The fast EIP-712 path agrees with eth-account and with the deployed DeviceRegistry itself."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.signing import ReadingDomain, address_of
from contracts.client import Chain, sign_reading


def test_digest_and_signature_match_the_contract_and_eth_account() -> None:
    chain = Chain.in_process()
    admin = chain.accounts[0]
    registry = chain.deploy("DeviceRegistry", admin, 0, 600, 8, sender=admin)
    domain = ReadingDomain(int(chain.w3.eth.chain_id), registry.address)
    key = bytes.fromhex(f"{7:064x}")
    device = address_of(key)
    for slot, wh, nonce in [(0, 0, 0), (12, -34, 5), (2**40, 2**62, 2**200)]:
        on_chain = chain.call(registry, "readingDigest", (device, slot, wh, nonce))
        assert domain.digest(device, slot, wh, nonce) == on_chain
        _, reference = sign_reading(
            key,
            chain_id=domain.chain_id,
            registry=registry.address,
            slot=slot,
            energy_wh=wh,
            nonce=nonce,
        )
        assert domain.sign(key, slot, wh, nonce) == reference
        assert domain.recover(device, slot, wh, nonce, reference) == device


def test_recovery_refuses_what_openzeppelin_refuses() -> None:
    domain = ReadingDomain(1, "0x" + "11" * 20)
    key = bytes.fromhex(f"{9:064x}")
    device = address_of(key)
    sig = domain.sign(key, 1, 2, 3)
    assert domain.recover(device, 1, 2, 3, sig) == device
    assert domain.recover(device, 1, 2, 3, sig[:64] + bytes([29])) == ""  # bad v
    assert domain.recover(device, 1, 2, 3, bytes(65)) == ""  # r = s = 0
    assert domain.recover(device, 1, 2, 3, sig[:64]) == ""  # short
    assert domain.recover(device, 1, 2, 4, sig) not in ("", device)  # another message


@settings(max_examples=300, deadline=None)
@given(
    device=st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex()),
    slot=st.integers(0, 2**63 - 1),
    wh=st.integers(-(2**63), 2**63 - 1),
    nonce=st.integers(0, 2**256 - 1),
    chain_id=st.integers(1, 2**32),
)
def test_fast_digest_is_the_chain_digest(
    device: str, slot: int, wh: int, nonce: int, chain_id: int
) -> None:
    """The bridge hashes with safe-pysha3 and per-device cached words; the bytes must be
    contracts.settler.ReadingSigner's for every reading the schema lets through."""
    domain = ReadingDomain(chain_id, "0x" + "5a" * 20)
    for _ in range(2):  # the second call takes the cached device word
        assert domain.digest(device, slot, wh, nonce) == domain.chain_digest(
            device, slot, wh, nonce
        )

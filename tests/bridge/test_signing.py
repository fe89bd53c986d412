"""The fast EIP-712 path agrees with eth-account and with the deployed DeviceRegistry itself."""

from __future__ import annotations

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

"""EIP-712 meter readings: the digest DeviceRegistry checks, recovery and signing, made fast.

`contracts.client.sign_reading` builds the typed-data message through eth-account, which is right
and slow (~1 ms). The bridge checks every reading and the simulator signs one per device per
slot, so here the domain separator is `contracts.settler.ReadingSigner`'s (hashed once), a
digest is two keccaks and recovery goes straight to coincurve (~0.1 ms a check on this machine,
~0.05 ms of it libsecp256k1 itself).

The two keccaks are `contracts.settler.keccak256` (safe-pysha3's C function: pycryptodome's
Python wrapper made each ~15 us, more than the public-key recovery, in a path every signed
reading takes), through `ReadingSigner.digest`, so the chain ledger, the simulator and the
bridge hash a reading with one piece of code.
The rules are the contract's own (OpenZeppelin ECDSA): v is 27/28 (or 0/1), s in the lower half
of the curve order, r and s non-zero. A signature the chain would refuse is refused here too, so
the bridge never relays one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import coincurve
from eth_utils import to_checksum_address

from contracts.settler import ReadingSigner, keccak256

#: secp256k1 group order; OpenZeppelin's ECDSA refuses s above half of it (malleability).
_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@dataclass(frozen=True)
class ReadingDomain:
    """The EIP-712 domain of one deployed DeviceRegistry: what binds a reading to it. The
    digest is `contracts.settler.ReadingSigner`'s, the one the chain ledger signs with."""

    chain_id: int
    registry: str
    _signer: ReadingSigner = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_signer", ReadingSigner(self.chain_id, self.registry))

    def digest(self, device: str, slot: int, energy_wh: int, nonce: int) -> bytes:
        """The hash DeviceRegistry.readingDigest returns for this reading."""
        return self._signer.digest(device, slot, energy_wh, nonce)

    def recover(self, device: str, slot: int, energy_wh: int, nonce: int, signature: bytes) -> str:
        """The checksum address that signed this reading, or "" where the chain would refuse it."""
        if len(signature) != 65:
            return ""
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:64], "big")
        v = signature[64]
        v = v - 27 if v >= 27 else v
        if v not in (0, 1) or not 0 < r < _N or not 0 < s <= _N // 2:
            return ""
        digest = self.digest(device, slot, energy_wh, nonce)
        try:
            public = coincurve.PublicKey.from_signature_and_message(
                signature[:64] + bytes([v]), digest, hasher=None
            )
        except ValueError:  # not a point on the curve: no signer
            return ""
        return _address_of_public(public.format(compressed=False))

    def sign(self, private_key: bytes, slot: int, energy_wh: int, nonce: int) -> bytes:
        """Sign as the device does: 65 bytes r || s || v with v in {27, 28}."""
        digest = self.digest(address_of(private_key), slot, energy_wh, nonce)
        sig = _private_key(private_key).sign_recoverable(digest, hasher=None)
        return sig[:64] + bytes([sig[64] + 27])


@functools.lru_cache(maxsize=65_536)
def _address_of_public(uncompressed: bytes) -> str:
    """Cached: a site has a fixed set of device keys, and this keccak is a fifth of a check."""
    return str(to_checksum_address(keccak256(uncompressed[1:])[-20:]))


@functools.lru_cache(maxsize=65_536)
def _private_key(private_key: bytes) -> coincurve.PrivateKey:
    """Cached: making one derives its public keys (two curve multiplications), which cost
    more than the signature a device makes with it each slot."""
    return coincurve.PrivateKey(private_key)


@functools.lru_cache(maxsize=65_536)
def address_of(private_key: bytes) -> str:
    """The checksum address of a device key."""
    return _address_of_public(_private_key(private_key).public_key.format(compressed=False))

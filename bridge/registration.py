"""Register a site's device keys in DeviceRegistry, so the chain accepts their signed readings.

An installer does this once per device; for a simulated site every device at once. Owners: a
prosumer's devices belong to an account derived from the site seed and the prosumer's name (the
household's wallet in a real site), site-wide devices to the registrar. Re-running is safe:
devices already registered are skipped, not failed.
"""

from __future__ import annotations

from eth_account import Account
from web3.contract import Contract

from bridge.messages import DeviceKind
from bridge.signing import address_of
from bridge.site import SiteManifest
from bridge.site_builder import device_key
from contracts.client import Chain, DeviceType, role_id
from contracts.errors import ChainError, ContractRevert

DEVICE_TYPES = {
    DeviceKind.METER: DeviceType.METER,
    DeviceKind.PV: DeviceType.INVERTER,
    DeviceKind.BATTERY: DeviceType.BATTERY,
    DeviceKind.APPLIANCE: DeviceType.APPLIANCE,
    DeviceKind.GRID_SENSOR: DeviceType.SENSOR,
}


def owner_of(site: SiteManifest, prosumer: str | None, registrar: str, seed: str = "0") -> str:
    """The account a device's readings are metered to."""
    if prosumer is None:
        return registrar
    return address_of(device_key(seed, f"owner:{site.site}:{prosumer}"))


def register_site(
    chain: Chain, registry: str, site: SiteManifest, key: bytes | None = None, seed: str = "0"
) -> dict[str, int]:
    """Register every device of `site`; returns counts of `registered` and `already`.

    `key` signs as the registrar; None uses the node's first unlocked account (anvil).
    """
    contract = chain.contract("DeviceRegistry", registry)
    sender = Account.from_key(key).address if key else chain.accounts[0]
    counts = {"registered": 0, "already": 0}
    for d in site.devices:
        args = (d.address, owner_of(site, d.prosumer, sender, seed), int(DEVICE_TYPES[d.kind]))
        try:
            if key is None:
                chain.transact(contract, "registerDevice", *args, d.capacity_w, sender=sender)
            else:
                _send_signed(chain, contract, key, (*args, d.capacity_w))
        except ContractRevert as err:
            if err.name != "DeviceRegistryAlreadyRegistered":
                raise
            counts["already"] += 1
            continue
        counts["registered"] += 1
    return counts


def _send_signed(chain: Chain, contract: Contract, key: bytes, args: tuple[object, ...]) -> None:
    """For a remote node with no unlocked accounts: pre-flight, sign locally, send, wait."""
    account = Account.from_key(key)
    call = contract.functions.registerDevice(*args)
    try:
        call.call({"from": account.address})
    except Exception as exc:
        raise chain.decode(exc, contract) from exc
    w3 = chain.w3
    tx = call.build_transaction(
        {"from": account.address, "nonce": w3.eth.get_transaction_count(account.address)}
    )
    signed = account.sign_transaction(tx)
    receipt = w3.eth.wait_for_transaction_receipt(
        w3.eth.send_raw_transaction(signed.raw_transaction)
    )
    if receipt["status"] != 1:
        raise ChainError(f"registerDevice({args[0]}) reverted (gas used {receipt['gasUsed']})")


def prosumer_keys(site: SiteManifest, seed: str = "0") -> dict[str, bytes]:
    """The private key of each prosumer's account (`owner_of`) of a simulated site, by name: the
    households' wallets, which sign their orders (a real site's households keep their own)."""
    return {p.name: device_key(seed, f"owner:{site.site}:{p.name}") for p in site.prosumers}


def enrol_market(
    chain: Chain,
    addresses: dict[str, str],
    site: SiteManifest,
    operator: str,
    credit: int,
    seed: str = "0",
    treasury_credit: int = 0,
) -> None:
    """Let the bridge trade for a simulated site on a local chain: its relaying account
    `operator` gets SlotSettler's OPERATOR_ROLE (the one transaction per slot), and every
    prosumer's account `credit` money units of deposit in EnergyTrading (buy orders need the
    escrow), minted as MockPaymentToken by the node's first account (the suite's admin), which is
    also the treasury and deposits `treasury_credit` (it pays imbalance surpluses out of it)."""
    admin = chain.accounts[0]
    settler = chain.contract("SlotSettler", addresses["SlotSettler"])
    chain.transact(settler, "grantRole", role_id("OPERATOR_ROLE"), operator, sender=admin)
    owners = [owner_of(site, p.name, admin, seed) for p in site.prosumers]
    token = chain.contract("MockPaymentToken", addresses["PaymentToken"])
    trading = chain.contract("EnergyTrading", addresses["EnergyTrading"])
    total = credit * len(owners) + treasury_credit
    if total <= 0:
        return
    chain.transact(token, "mint", admin, total, sender=admin)
    chain.transact(token, "approve", trading.address, total, sender=admin)
    if credit > 0:
        chain.transact(trading, "depositFor", owners, [credit] * len(owners), sender=admin)
    if treasury_credit > 0:
        chain.transact(trading, "deposit", treasury_credit, sender=admin)


def reading_nonces(chain: Chain, registry: str, site: SiteManifest) -> dict[str, int]:
    """Each device's next reading nonce as DeviceRegistry counts it (`nonces(device)`).

    A device signs its readings with consecutive nonces and the registry takes them only in
    order; a simulator restarted against a chain that already holds its readings must start
    where the chain is, not at 0.
    """
    contract = chain.contract("DeviceRegistry", registry)
    return {d.id: int(contract.functions.nonces(d.address).call()) for d in site.devices}

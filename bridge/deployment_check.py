"""Refuse, at start-up, a deployment whose contracts do not take this bridge's calls.

Why: the bridge encodes its calls from its own compiled artifacts (`contracts/build`). When a
contract's interface changes (``SlotSettler.run`` took a new input struct in one session), an
old deployment still answers on the same addresses, and every slot row would revert or, worse,
be decoded differently; the outbox would repair and fail rows for days before anyone looked. So
a live bridge checks the deployment once, before it connects, and stops with an error that names
the manifest field and what to do:

* the manifest's ``artifactHashes`` (written by ``microgrid chain deploy``) against this build's
  `artifact_hashes`, for every contract the bridge calls: a manifest of other sources, or one
  without hashes, is refused;
* the code at each address against this build's ``deployedBytecode``: the same length and the
  same bytes everywhere except the constructor's immutables, which the compiler leaves as zero
  placeholders. A manifest whose hashes were copied over but whose addresses run older code (or
  nothing: another chain, a reset node) is refused too.

One ``eth_getCode`` per contract, once: nothing of this runs per slot.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from bridge.config import Deployment
from bridge.errors import ConfigError
from contracts.compile import artifact_hashes, load_artifact

if TYPE_CHECKING:
    from contracts.client import Chain

#: The contracts the bridge calls (those the manifest names).
BRIDGE_CONTRACTS = ("DeviceRegistry", "SlotSettler", "EnergyTrading", "GridBalance", "RewardSystem")

DEPLOY_AGAIN = (
    "deploy the current contracts with `microgrid chain deploy --rpc <url> --manifest <path>` "
    "(and register the site again), then point chain.deployment at the manifest it writes"
)


def bridge_contracts(deployment: Deployment) -> list[str]:
    """The contracts this bridge calls that `deployment` names, in a fixed order."""
    return [name for name in BRIDGE_CONTRACTS if name in deployment.addresses]


def check_manifest(deployment: Deployment, ours: Mapping[str, str] | None = None) -> None:
    """The manifest's ``artifactHashes`` of every contract the bridge calls are this build's
    (`ours`, default `artifact_hashes`)."""
    ours = artifact_hashes() if ours is None else ours
    if deployment.artifact_hashes is None:
        raise ConfigError(
            "chain.deployment: artifactHashes: expected the artifact hashes `microgrid chain "
            "deploy` writes, to show the deployment takes this bridge's calls; the manifest has "
            f"none: {DEPLOY_AGAIN}"
        )
    for name in bridge_contracts(deployment):
        theirs, mine = deployment.artifact_hashes.get(name), ours.get(name)
        if theirs != mine:
            raise ConfigError(
                f"chain.deployment: artifactHashes.{name}: expected {str(mine)[:16]}... (this "
                f"bridge's build), got {str(theirs)[:16]}...: the deployment runs {name} from "
                f"other sources, whose calls (e.g. SlotSettler.run's input) may not match; "
                f"{DEPLOY_AGAIN}"
            )


def same_code(on_chain: bytes, built: bytes) -> bool:
    """Whether runtime code `on_chain` is `built` (a ``deployedBytecode``) with its immutables
    filled in: the same length, and every differing byte a zero placeholder in `built`."""
    if len(on_chain) != len(built):
        return False
    return all(a == b or b == 0 for a, b in zip(on_chain, built, strict=True))


def check_code(chain: Chain, deployment: Deployment) -> None:
    """The code at each address the bridge calls is this build's (immutables aside)."""
    for name in bridge_contracts(deployment):
        address = deployment.addresses[name]
        code = bytes(chain.w3.eth.get_code(chain.w3.to_checksum_address(address)))
        built = bytes.fromhex(str(load_artifact(name)["deployedBytecode"]).removeprefix("0x"))
        if not same_code(code, built):
            what = "no code" if not code else f"{len(code)} bytes of other code"
            raise ConfigError(
                f"chain.deployment: addresses.{name}: expected this bridge's {name} at "
                f"{address}, found {what} (an older deployment, another chain or a reset "
                f"node); {DEPLOY_AGAIN}"
            )


def check_deployment(chain: Chain, deployment: Deployment) -> None:
    """Both checks (see the module docstring): the manifest first, then the chain's code."""
    check_manifest(deployment)
    check_code(chain, deployment)

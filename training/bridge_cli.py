"""`microgrid devices ...` and `microgrid bridge ...`: the operator's commands for the live bridge.

These live in `training` only because the site manifest and the simulator's profiles come from a
scenario, which needs the grid builder (pandapower), and `bridge` may not import it. `bridge run`
itself needs nothing from the scenario: it reads the site manifest written by `devices site`.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

devices_app = typer.Typer(
    help="Field devices: the site manifest, registration, and the device simulator.",
    no_args_is_help=True,
)
bridge_app = typer.Typer(
    help="The grid bridge: a frozen policy against live devices and the contracts.",
    no_args_is_help=True,
)
console = Console()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
ScenarioOpt = Annotated[
    Path | None, typer.Option("--scenario", help="Scenario YAML (default: the built-in rural1).")
]
SiteIdOpt = Annotated[str, typer.Option("--site-id", help="Site id (the topics' <site> level).")]
SeedOpt = Annotated[
    str, typer.Option(help="Seed of the simulated device keys (never for real devices).")
]


def _fail(err: Exception) -> None:
    console.print(f"[red]error:[/red] {err}")
    raise typer.Exit(2)


def _show(title: str, data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, default=str))
        return
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in data.items():
        shown = json.dumps(v, default=str) if isinstance(v, dict | list) else str(v)
        table.add_row(k, shown)
    console.print(table)


def _grid(scenario: Path | None) -> Any:
    from envs import load_scenario
    from envs.grid import build_grid

    return build_grid(load_scenario(scenario) if scenario else load_scenario())


@devices_app.command("site")
def devices_site(
    scenario: ScenarioOpt = None,
    out: Annotated[Path, typer.Option(help="Where to write the site manifest.")] = Path(
        "site.json"
    ),
    site_id: SiteIdOpt = "site1",
    seed: SeedOpt = "0",
    as_json: JsonOpt = False,
) -> None:
    """Write the site manifest of a scenario: one meter, inverter, battery and appliance per
    prosumer, the community battery, one feeder sensor; the codec the policy was trained on."""
    from bridge.site_builder import build_site
    from envs import MicrogridError, load_scenario

    try:
        market = (load_scenario(scenario) if scenario else load_scenario()).market
        site = build_site(_grid(scenario), site=site_id, seed=seed, market=market)
    except MicrogridError as err:
        _fail(err)
    site.save(out)
    kinds: dict[str, int] = {}
    for d in site.devices:
        kinds[d.kind.value] = kinds.get(d.kind.value, 0) + 1
    _show(
        f"site {site.site} ({site.grid_code})",
        {"manifest": str(out), "devices": len(site.devices), **kinds},
        as_json,
    )


@devices_app.command("register")
def devices_register(
    site: Annotated[Path, typer.Option(help="Site manifest (`devices site`).")] = Path("site.json"),
    deployment: Annotated[Path, typer.Option(help="`chain deploy` manifest.")] = Path(
        "deployment.json"
    ),
    rpc: Annotated[str, typer.Option(help="JSON-RPC URL of the chain.")] = "http://127.0.0.1:8545",
    key_file: Annotated[
        Path | None,
        typer.Option(help="Hex key of an account with REGISTRAR_ROLE (default: the node's first)."),
    ] = None,
    operator: Annotated[
        str | None,
        typer.Option(
            help="Simulated site on a local chain: the bridge's relaying address, given "
            "SlotSettler's OPERATOR_ROLE; the households and the treasury get deposits."
        ),
    ] = None,
    credit: Annotated[float, typer.Option(help="Each household's deposit (currency).")] = 100.0,
    treasury_credit: Annotated[
        float, typer.Option(help="The treasury's deposit (currency).")
    ] = 100_000.0,
    prosumer_keys_out: Annotated[
        Path | None,
        typer.Option(
            "--prosumer-keys-out",
            help="Write the simulated households' order keys here (the bridge's "
            "chain.prosumer_keys).",
        ),
    ] = None,
    seed: SeedOpt = "0",
    as_json: JsonOpt = False,
) -> None:
    """Register every device's key address in DeviceRegistry (already registered: skipped);
    with --operator, let the bridge trade for a simulated site (see docs/iot.md)."""
    from bridge.config import load_deployment
    from bridge.errors import BridgeError
    from bridge.registration import enrol_market, prosumer_keys, register_site
    from bridge.site import load_site
    from contracts.client import Chain
    from contracts.errors import ChainError
    from envs.ledger import units

    try:
        manifest = load_site(site)
        dep = load_deployment(deployment)
        chain = Chain.rpc(rpc)
        key = bytes.fromhex(key_file.read_text().strip().removeprefix("0x")) if key_file else None
        result: dict[str, Any] = dict(
            register_site(chain, dep.addresses["DeviceRegistry"], manifest, key, seed)
        )
        if operator is not None:
            enrol_market(
                chain, dep.addresses, manifest, operator, units(credit), seed,
                treasury_credit=units(treasury_credit),
            )  # fmt: skip
            result["operator"] = operator
        if prosumer_keys_out is not None:
            keys = {k: v.hex() for k, v in prosumer_keys(manifest, seed).items()}
            prosumer_keys_out.parent.mkdir(parents=True, exist_ok=True)  # e.g. a fresh .bridge/
            prosumer_keys_out.write_text(json.dumps(keys, indent=1))
            result["prosumer_keys"] = str(prosumer_keys_out)
    except (BridgeError, ChainError, OSError) as err:
        _fail(err)
    _show(f"registered site {manifest.site}", result, as_json)


@devices_app.command("oscore")
def devices_oscore(
    coap_device: Annotated[
        list[str],
        typer.Option(
            "--coap-device",
            help="A device that speaks CoAP: an id or a glob such as '*-battery' (repeatable), "
            "as in the bridge's coap.endpoints.",
        ),
    ],
    site: Annotated[Path, typer.Option(help="Site manifest (`devices site`).")] = Path("site.json"),
    out: Annotated[
        Path,
        typer.Option(
            help="Folder of the contexts: bridge/<id>/ (coap.oscore_dir) and devices/<id>/."
        ),
    ] = Path(".bridge/oscore"),
    renew: Annotated[
        bool, typer.Option("--renew", help="Replace existing contexts with fresh secrets.")
    ] = False,
    reader: Annotated[
        str | None,
        typer.Option(
            help="Write a reader's own read-only contexts instead (e.g. 'shadow' for "
            "`bridge run --dry-run`): OUT/readers/NAME/<id>/ (coap.shadow_oscore_dir) and "
            "OUT/devices/<id>/readers/NAME/."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a pre-shared OSCORE context per CoAP device, both ends: OUT/bridge/<id>/ for the
    bridge (coap.oscore_dir) and OUT/devices/<id>/ for the device (devices simulate
    --coap-oscore). Existing contexts are kept (their sequence numbers go on) unless --renew.
    With --reader NAME, a reader's (a shadow bridge's) own contexts, which may only read."""
    from bridge.coap_resources import match_devices
    from bridge.errors import BridgeError
    from bridge.oscore import BRIDGE_SIDE, DEVICE_SIDE, provision, reader_folder
    from bridge.site import load_site

    try:
        manifest = load_site(site)
        ids = match_devices(
            dict.fromkeys(coap_device, "coap://127.0.0.1"),
            [d.id for d in manifest.devices],
            field="--coap-device",
        )
        bridge_end = out / BRIDGE_SIDE if reader is None else reader_folder(out, reader)
        done = provision(sorted(ids), out, renew=renew, reader=reader)
    except (BridgeError, OSError) as err:
        _fail(err)
    _show(
        f"OSCORE contexts of site {manifest.site}",
        {
            "bridge": str(bridge_end),
            "devices": str(out / DEVICE_SIDE),
            "written": len(done["written"]),
            "kept": len(done["kept"]),
        },
        as_json,
    )


@devices_app.command("simulate")
def devices_simulate(
    scenario: ScenarioOpt = None,
    broker: Annotated[str, typer.Option(help="Broker URL.")] = "mqtts://127.0.0.1:8883",
    passwords: Annotated[Path, typer.Option(help="JSON file {device id: broker password}.")] = Path(
        "passwords.json"
    ),
    ca_file: Annotated[Path | None, typer.Option(help="CA of the broker's certificate.")] = None,
    site: Annotated[
        Path | None, typer.Option(help="Site manifest (default: built from the scenario).")
    ] = None,
    deployment: Annotated[
        Path, typer.Option(help="`chain deploy` manifest: the readings' EIP-712 domain.")
    ] = Path("deployment.json"),
    site_id: SiteIdOpt = "site1",
    seed: SeedOpt = "0",
    slot_seconds: Annotated[
        float | None,
        typer.Option(min=0.1, help="Wall-clock slot length (default: the deployment's, 900)."),
    ] = None,
    genesis: Annotated[
        float | None, typer.Option(help="Start of slot 0, unix s (default: the deployment's).")
    ] = None,
    slots: Annotated[int | None, typer.Option(min=1, help="Stop after this many slots.")] = None,
    rpc: Annotated[
        str | None,
        typer.Option(help="JSON-RPC URL: start each device's reading nonce at the registry's."),
    ] = None,
    coap_device: Annotated[
        list[str] | None,
        typer.Option(
            "--coap-device",
            help="Serve this device over CoAP instead of MQTT: an id or a glob such as "
            "'bus6-*' (repeatable). The bridge config names the same devices under coap.endpoints.",
        ),
    ] = None,
    coap_bind: Annotated[
        str,
        typer.Option(help="HOST:PORT (UDP) where the CoAP devices answer, all on one port."),
    ] = "127.0.0.1:5683",
    coap_oscore: Annotated[
        Path,
        typer.Option(
            help="The CoAP devices' ends of their OSCORE contexts, <dir>/<id>/ "
            "(`devices oscore` writes OUT/devices)."
        ),
    ] = Path(".bridge/oscore/devices"),
    coap_insecure: Annotated[
        bool,
        typer.Option(
            "--coap-insecure",
            help="Serve plain CoAP without OSCORE: anyone on the network can command the "
            "devices. A lab only; the bridge config then says coap.insecure: true.",
        ),
    ] = False,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            "--fault",
            help="Inject a fault, KIND=RATE per device message (repeatable): dropout, stuck, "
            "clock_skew, malformed, forged (docs/iot.md, 'Injecting faults').",
        ),
    ] = None,
    fault_skew_s: Annotated[
        float, typer.Option(help="Seconds a clock_skew fault shifts a message's ts by.")
    ] = -300.0,
    as_json: JsonOpt = False,
) -> None:
    """Run every device of the site, driven by the scenario's load and PV profiles; each obeys
    commands within its limits. Devices speak MQTT on the broker (each with its own key and
    password), or CoAP on --coap-bind for those picked with --coap-device."""
    from bridge.clock import SlotClock
    from bridge.coap_resources import match_devices
    from bridge.coap_server import serving
    from bridge.config import load_deployment
    from bridge.errors import BridgeError
    from bridge.faults import FaultPlan
    from bridge.logs import setup_json_logging
    from bridge.signing import ReadingDomain
    from bridge.simulator import FleetStats, Profiles, simulate
    from bridge.site import load_site
    from bridge.site_builder import build_site
    from contracts.errors import ChainError
    from envs import MicrogridError

    setup_json_logging()
    try:
        plan = FaultPlan.parse(fault or [], fault_skew_s)
        params = _grid(scenario)
        manifest = load_site(site) if site else build_site(params, site=site_id, seed=seed)
        if manifest.grid_code != params.grid_code:
            raise BridgeError(
                f"site.grid_code: expected the scenario's {params.grid_code!r}, "
                f"got {manifest.grid_code!r}"
            )
        dep = load_deployment(deployment)
        on_coap = match_devices(
            dict.fromkeys(coap_device or [], f"coap://{coap_bind}"),
            [d.id for d in manifest.devices],
            field="--coap-device",
        )
        everyone_on_coap = len(on_coap) == len(manifest.devices)
        secrets = {} if everyone_on_coap else json.loads(passwords.read_text())
        clock = SlotClock(
            dep.genesis if genesis is None else genesis,
            slot_seconds or dep.slot_seconds,
            dep.genesis,
            dep.slot_seconds,
        )
        nonces = None
        if rpc is not None:
            from bridge.registration import reading_nonces
            from contracts.client import Chain

            nonces = reading_nonces(Chain.rpc(rpc), dep.addresses["DeviceRegistry"], manifest)

        async def run() -> tuple[FleetStats, int]:
            endpoint = next(iter(on_coap.values()), None)
            host, port = (endpoint.host, endpoint.port) if endpoint else ("", 0)
            oscore_dir = None if coap_insecure else coap_oscore
            async with serving(manifest.site, on_coap, host, port, oscore_dir) as coap:
                stats = await simulate(
                    manifest,
                    Profiles.of(params),
                    ReadingDomain(dep.chain_id, dep.addresses["DeviceRegistry"]),
                    broker_url=broker,
                    passwords=secrets,
                    ca_file=ca_file,
                    clock=clock,
                    seed=seed,
                    slots=slots,
                    start_nonces=nonces,
                    coap=coap,
                    faults=plan,
                )
                return stats, 0 if coap is None else coap.commands

        stats, coap_commands = asyncio.run(run())
    except (MicrogridError, ChainError, OSError, KeyError, json.JSONDecodeError) as err:
        _fail(err)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    _show(
        f"simulated site {manifest.site}",
        {
            **{k: v for k, v in stats.__dict__.items() if k != "per_device"},
            "coap_devices": len(on_coap),
            "coap_commands": coap_commands,
        },
        as_json,
    )


@bridge_app.command("run")
def bridge_run(
    config: Annotated[Path, typer.Option(help="Bridge YAML.")] = Path("configs/bridge/local.yaml"),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Shadow mode: decide and log, command nothing.")
    ] = False,
    slots: Annotated[
        int | None, typer.Option(min=1, help="Stop after deciding this many slots.")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65_535,
            help="Prometheus port instead of the config's metrics_port (0: a free one); a "
            "shadow beside the live bridge needs its own.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve the configured policy against the site's devices until stopped (Ctrl-C): over MQTT,
    and over CoAP for the devices the config names under coap.endpoints. JSON logs go to stderr,
    a summary to stdout at the end."""
    from bridge.config import load_bridge_config, load_deployment
    from bridge.errors import BridgeError
    from bridge.heap import settle_heap
    from bridge.logs import setup_json_logging
    from bridge.policy_source import load_policy
    from bridge.runner import BridgeRunner
    from bridge.site import load_site
    from envs import MicrogridError

    try:
        cfg = load_bridge_config(
            config, dry_run=True if dry_run else None, metrics_port=metrics_port
        )
        setup_json_logging(file=cfg.log_file)
        site = load_site(cfg.site)
        dep = load_deployment(cfg.chain.deployment)
        loaded = load_policy(cfg.policy.source, site.make_codec(), cfg.policy.tracking_uri)
        runner = BridgeRunner(cfg, site, dep, loaded)
    except (MicrogridError, OSError) as err:
        _fail(err)
    settle_heap()
    started = time.monotonic()
    try:
        summary = asyncio.run(runner.run(slots))
    except BridgeError as err:
        _fail(err)
    except KeyboardInterrupt:
        summary = runner.summary()
    summary["seconds"] = round(time.monotonic() - started, 3)
    _show(f"bridge {site.site} ({summary['mode']})", summary, as_json)

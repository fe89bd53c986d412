"""The bridge config and the deployment manifest: defaults run offline, errors name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.config import load_bridge_config, load_deployment
from bridge.errors import ConfigError
from tests.bridge.services import REPO


def test_the_shipped_local_config_loads_and_resolves_paths_from_its_folder() -> None:
    cfg = load_bridge_config(REPO / "configs/bridge/local.yaml")
    assert cfg.site.resolve() == (REPO / "site.json").resolve()
    assert cfg.broker.url.startswith("mqtts://") and cfg.policy.source == "builtin:rule-based"
    assert not cfg.dry_run
    assert load_bridge_config(REPO / "configs/bridge/local.yaml", dry_run=True).dry_run


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("broker: {url: 'http://x:1'}", "broker.url: expected mqtts://HOST:PORT"),
        ("policy: {source: 'builtin:magic'}", "policy.source: expected builtin:rule-based"),
        ("timing: {decide_deadline: 1.5}", "timing.decide_deadline: Input should be less than 1"),
        ("brokr: {}", "brokr: no such field"),
        ("node: 'a/b'", "node: String should match pattern"),
        ("- 1", "expected a mapping of settings"),
        (
            "coap: {endpoints: {'*-battery': 'coap://127.0.0.1'}}",
            "coap: oscore_dir: expected the folder of the bridge's OSCORE contexts",
        ),
        ("coap: {oscore_dir: o, insecure: true}", "coap: oscore_dir: expected either"),
        ("coap: {insecure: 'maybe'}", "coap.insecure: Input should be a valid boolean"),
    ],
)
def test_errors_name_the_field_and_the_expected_value(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_bridge_config(path)


def test_absolute_paths_stay_absolute(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("broker: {ca_file: /etc/ca.crt, password_file: pw}")
    cfg = load_bridge_config(path)
    assert cfg.broker.ca_file == Path("/etc/ca.crt")
    assert cfg.broker.password_file == tmp_path / "pw"


def test_deployment_manifest_needs_the_registry(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"chainId": 1, "addresses": {}, "genesis": 0, "slotSeconds": 900}))
    with pytest.raises(ConfigError, match="addresses: expected a DeviceRegistry address"):
        load_deployment(path)
    with pytest.raises(ConfigError, match=r"chain\.deployment: expected the JSON manifest"):
        load_deployment(tmp_path / "missing.json")

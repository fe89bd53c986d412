"""The committed artifacts must be exactly what the committed sources compile to."""

from __future__ import annotations

import json
from pathlib import Path

from contracts.compile import BUILD_DIR, SOURCE_DIR, artifact_hashes, compile_all, load_artifact
from contracts.errors import CompileError

DEPLOYABLE = {
    "DeviceRegistry",
    "EnergyTrading",
    "GridBalance",
    "RewardSystem",
    "RewardToken",
    "SlotSettler",
    "MicrogridGovernor",
    "MicrogridTimelock",
    "MockPaymentToken",
    "ReentrantToken",
    "ReentrancyAttacker",
}


def test_committed_artifacts_match_a_fresh_compile(tmp_path: Path) -> None:
    written = compile_all(tmp_path)
    assert set(written) == DEPLOYABLE
    fresh = {p.name: p.read_bytes() for p in sorted(tmp_path.glob("*.json"))}
    committed = {p.name: p.read_bytes() for p in sorted(BUILD_DIR.glob("*.json"))}
    stale = sorted(
        name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
    )
    assert not stale, f"artifacts out of date, run `make contracts`: {stale}"


def test_artifacts_carry_abi_bytecode_and_settings() -> None:
    for name in DEPLOYABLE:
        artifact = load_artifact(name)
        assert artifact["contractName"] == name
        assert artifact["bytecode"].startswith("0x") and len(artifact["bytecode"]) > 100
        assert bytes.fromhex(artifact["bytecode"][2:])  # valid hex, non-empty
        assert artifact["compiler"]["settings"]["optimizer"]["enabled"] is True
        assert artifact["compiler"]["version"].startswith("0.8.")
    # EIP-170: deployed code must stay under 24,576 bytes or mainnet-like chains refuse it.
    for name in DEPLOYABLE:
        code = load_artifact(name)["deployedBytecode"]
        assert (len(code) - 2) // 2 < 24_576, name


def test_artifacts_are_written_with_sorted_keys() -> None:
    for path in BUILD_DIR.glob("*.json"):
        text = path.read_text(encoding="utf-8")
        assert text == json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n"


def test_hashes_cover_every_artifact() -> None:
    hashes = artifact_hashes()
    assert set(hashes) == DEPLOYABLE
    assert all(len(h) == 64 for h in hashes.values())


def test_missing_artifact_raises_compile_error(tmp_path: Path) -> None:
    try:
        load_artifact("NoSuchContract", tmp_path)
    except CompileError as exc:
        assert "NoSuchContract" in str(exc)
    else:
        raise AssertionError("load_artifact accepted a missing artifact")


def test_compile_error_names_the_problem(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "Broken.sol").write_text(
        "// SPDX-License-Identifier: MIT\n"
        "pragma solidity ^0.8.24;\n"
        "contract Broken { uint x = ; }\n"
    )
    try:
        compile_all(tmp_path / "out", src)
    except CompileError as exc:
        assert "Broken.sol" in str(exc)
    else:
        raise AssertionError("a syntax error compiled")


def test_sources_exist_for_every_contract_of_the_suite() -> None:
    names = {p.stem for p in SOURCE_DIR.glob("*.sol")}
    for contract in ("EnergyTrading", "GridBalance", "DeviceRegistry", "RewardSystem"):
        assert contract in names and f"I{contract}" in names

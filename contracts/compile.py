"""Compile the Solidity sources in ``contracts/src`` into committed ABI + bytecode artifacts.

No native ``solc`` can be installed here, so the pinned solc-js from ``node_modules`` (npm
``solc``) does the work in standard-JSON mode. Import resolution happens in Python rather than in
solc-js's callback: every source (ours and OpenZeppelin's) is handed to the compiler as literal
content under a stable unit name, so the output never depends on absolute paths or the working
directory and the artifacts are byte-for-byte reproducible. ``python -m contracts.compile``
(``make contracts``) and ``microgrid chain compile`` both call :func:`compile_all`.

The Python package itself only *reads* the artifacts (:func:`load_artifact`); Node is needed only to
rebuild them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from contracts.errors import CompileError

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
SOURCE_DIR = PACKAGE_DIR / "src"
BUILD_DIR = PACKAGE_DIR / "build"
NODE_MODULES = REPO_ROOT / "node_modules"

#: The EVM fork the bytecode targets. eth-tester 0.14 runs Prague and anvil runs Prague or later,
#: so Cancun opcodes (MCOPY, transient storage) are safe everywhere the suite is deployed.
EVM_VERSION = "cancun"
#: Optimizer runs tuned for code that is called many times (settlement) over deployment size.
OPTIMIZER_RUNS = 200

_IMPORT_RE = re.compile(
    r"""^\s*import\s+(?:[^"';]*?\bfrom\s+)?["']([^"']+)["']\s*;""", re.MULTILINE
)


def compiler_settings() -> dict[str, Any]:
    """Return the solc standard-JSON ``settings`` object; part of every artifact for audit."""
    return {
        "evmVersion": EVM_VERSION,
        "optimizer": {"enabled": True, "runs": OPTIMIZER_RUNS},
        "viaIR": False,
        "outputSelection": {
            "*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}
        },
    }


def _unit_path(unit: str, source_dir: Path) -> Path:
    """Map a solc source unit name to the file that holds it."""
    if unit.startswith("@"):
        return NODE_MODULES / unit
    return source_dir / unit.removeprefix("src/")


def _resolve(importer: str, target: str) -> str:
    """Resolve an import the way solc does: relative to the importer's unit name, else verbatim."""
    if not target.startswith("."):
        return target
    parts = importer.split("/")[:-1]
    for piece in target.split("/"):
        if piece == "..":
            parts.pop()
        elif piece not in (".", ""):
            parts.append(piece)
    return "/".join(parts)


def collect_sources(source_dir: Path = SOURCE_DIR) -> dict[str, str]:
    """Return every source unit reachable from ``source_dir``, keyed by unit name, sorted.

    Our files are named ``src/<relative path>``; OpenZeppelin files keep their npm import path.
    """
    if not (NODE_MODULES / "@openzeppelin" / "contracts").is_dir():
        raise CompileError(
            "node_modules/@openzeppelin/contracts is missing: run `npm ci` (or `make setup`) first"
        )
    pending = [
        "src/" + path.relative_to(source_dir).as_posix()
        for path in sorted(source_dir.rglob("*.sol"))
    ]
    sources: dict[str, str] = {}
    while pending:
        unit = pending.pop()
        if unit in sources:
            continue
        path = _unit_path(unit, source_dir)
        if not path.is_file():
            raise CompileError(f"import {unit!r} not found (looked at {path})")
        text = path.read_text(encoding="utf-8")
        sources[unit] = text
        pending.extend(_resolve(unit, target) for target in _IMPORT_RE.findall(text))
    return dict(sorted(sources.items()))


def solc_version() -> str:
    """Return the pinned solc-js version (e.g. ``0.8.28+commit.7893614a.Emscripten.clang``)."""
    return _run_node(["-e", "process.stdout.write(require('solc').version())"], "")


def _run_node(args: list[str], stdin: str) -> str:
    node = shutil.which("node")
    if node is None:
        raise CompileError("node is not on PATH: solc-js needs Node.js to rebuild the artifacts")
    proc = subprocess.run(
        [node, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=False,
    )
    if proc.returncode != 0:
        raise CompileError(f"solc-js failed ({proc.returncode}): {proc.stderr.strip()[:2000]}")
    return proc.stdout


def compile_sources(sources: dict[str, str]) -> dict[str, Any]:
    """Run solc-js in standard-JSON mode over ``sources``; raise CompileError on any error."""
    request = {
        "language": "Solidity",
        "sources": {unit: {"content": text} for unit, text in sources.items()},
        "settings": compiler_settings(),
    }
    script = (
        "let s='';process.stdin.on('data',d=>s+=d);"
        "process.stdin.on('end',()=>process.stdout.write(require('solc').compile(s)));"
    )
    output: dict[str, Any] = json.loads(_run_node(["-e", script], json.dumps(request)))
    # Warnings in our own sources fail the build too: they are nearly always real mistakes
    # (shadowing, unused values), and OpenZeppelin's are not ours to fix.
    errors = [
        e
        for e in output.get("errors", [])
        if e.get("severity") == "error"
        or str(e.get("sourceLocation", {}).get("file", "")).startswith("src/")
    ]
    if errors:
        raise CompileError("\n".join(e.get("formattedMessage", e["message"]) for e in errors))
    return output


def compile_all(out_dir: Path = BUILD_DIR, source_dir: Path = SOURCE_DIR) -> dict[str, Path]:
    """Compile every deployable contract under ``source_dir`` and write one artifact per contract.

    Interfaces, libraries without code and abstract contracts are skipped (they have no bytecode);
    OpenZeppelin contracts are never written. Stale artifacts in ``out_dir`` are removed so the
    directory always mirrors the sources. Returns ``{contract name: artifact path}``.
    """
    sources = collect_sources(source_dir)
    output = compile_sources(sources)
    version = solc_version()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for unit, contracts in sorted(output["contracts"].items()):
        if not unit.startswith("src/"):
            continue
        for name, data in sorted(contracts.items()):
            bytecode = data["evm"]["bytecode"]["object"]
            if not bytecode:
                continue
            if name in written:
                raise CompileError(f"two contracts are named {name!r}; names must be unique")
            artifact = {
                "contractName": name,
                "sourceName": unit,
                "abi": data["abi"],
                "bytecode": "0x" + bytecode,
                "deployedBytecode": "0x" + data["evm"]["deployedBytecode"]["object"],
                "compiler": {"version": version, "settings": compiler_settings()},
                "sourceHash": hashlib.sha256(sources[unit].encode()).hexdigest(),
            }
            path = out_dir / f"{name}.json"
            path.write_text(json.dumps(artifact, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            written[name] = path
    for stale in out_dir.glob("*.json"):
        if stale.stem not in written:
            stale.unlink()
    return written


def load_artifact(name: str, build_dir: Path = BUILD_DIR) -> dict[str, Any]:
    """Read one committed artifact (ABI + bytecode); Node is not needed for this."""
    path = build_dir / f"{name}.json"
    if not path.is_file():
        raise CompileError(f"no artifact {name!r} in {build_dir}: run `make contracts`")
    artifact: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return artifact


def artifact_hashes(build_dir: Path = BUILD_DIR) -> dict[str, str]:
    """SHA-256 of every artifact file, for deployment manifests that pin what was deployed."""
    return {
        path.stem: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(build_dir.glob("*.json"))
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``python -m contracts.compile [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=BUILD_DIR, help="artifact directory")
    args = parser.parse_args(argv)
    try:
        written = compile_all(args.out)
    except CompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, path in written.items():
        print(f"{name:>24}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the serving policy comes from: an MLflow alias, an ONNX file, or a built-in controller.

The bridge serves frozen ONNX graphs only (`agents.frozen.OnnxPolicy`: onnxruntime, no torch).
`models:/NAME@ALIAS` is resolved to a registry version so the bridge can tell when the alias
moves (hot reload) and say in NBIRTH and the logs exactly which version decides. The built-ins
let a site run, and the tests run, with no trained model at all.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from agents.baselines import IdlePolicy, RuleBasedPolicy
from agents.policy import Policy
from bridge.errors import ConfigError
from envs.codec import Codec


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    name: str
    """What NBIRTH and the logs show, e.g. `models:/microgrid-ppo/7` or a file path."""
    version: str | None = None
    """The registry version behind an alias (None for files and built-ins)."""


def _alias(source: str) -> tuple[str, str] | None:
    rest = source.removeprefix("models:/")
    if "@" not in rest:
        return None
    name, alias = rest.split("@", 1)
    return name, alias


def alias_version(source: str, tracking_uri: str) -> str | None:
    """The version an MLflow alias points to now (None when `source` is not an alias)."""
    parsed = _alias(source) if source.startswith("models:/") else None
    if parsed is None:
        return None
    from mlflow import MlflowClient

    try:
        mv = MlflowClient(tracking_uri=tracking_uri).get_model_version_by_alias(*parsed)
    except Exception as exc:  # MlflowException, a database that cannot be read, ...
        raise ConfigError(
            f"policy.source: expected a registered model alias at {tracking_uri}, "
            f"got {source!r} ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    return str(mv.version)


def load_policy(source: str, codec: Codec, tracking_uri: str) -> LoadedPolicy:
    """Load `source`; an alias is pinned to its current version so a reload can compare."""
    if source == "builtin:rule-based":
        return LoadedPolicy(RuleBasedPolicy(codec), source)
    if source == "builtin:idle":
        return LoadedPolicy(IdlePolicy(codec), source)
    from agents.frozen import OnnxPolicy

    if not source.startswith("models:/"):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"policy.source: expected an .onnx file, got {source!r} (missing)")
        return LoadedPolicy(OnnxPolicy(path), str(path))
    version = alias_version(source, tracking_uri)
    uri = source
    if version is not None:
        name, _ = _alias(source) or ("", "")
        uri = f"models:/{name}/{version}"
    import mlflow
    import onnx

    mlflow.set_tracking_uri(tracking_uri)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
            files = list(local.rglob("*.onnx")) if local.is_dir() else [local]
            if not files:
                raise ConfigError(f"policy.source: expected an .onnx file in {uri}, found none")
            data = onnx.load(str(files[0])).SerializeToString()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"policy.source: expected a downloadable model at {uri} ({type(exc).__name__}: "
            f"{str(exc)[:200]})"
        ) from None
    return LoadedPolicy(OnnxPolicy(data), uri, version)

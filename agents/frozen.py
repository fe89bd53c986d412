"""Frozen policies for serving: an ONNX file (onnxruntime), no torch or SB3 needed.

The graph already contains the observation normalisation and the action clipping
(`training.export`), so `OnnxPolicy.predict` maps raw codec observations to actions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class OnnxPolicy:
    """A policy served by onnxruntime from ONNX bytes or a file."""

    name = "agent"

    def __init__(self, model: bytes | str | Path) -> None:
        import onnxruntime as ort

        data = Path(model).read_bytes() if isinstance(model, str | Path) else model
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # the policy is tiny; threads only add latency
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name

    def predict(self, obs: np.ndarray) -> np.ndarray:
        o = np.asarray(obs, dtype=np.float32)
        single = o.ndim == 1
        out = self.session.run(None, {self._input: o[None] if single else o})[0]
        return out[0] if single else out


class Sb3Policy:
    """A policy served from an SB3 zip plus its VecNormalize statistics (torch needed).

    The ONNX export is the lighter way to serve; this loader is for checking an export
    against its source, or for resuming work on a run's own files.
    """

    name = "agent"

    def __init__(self, model_zip: str | Path, vecnormalize: str | Path | None = None) -> None:
        import pickle

        from stable_baselines3 import PPO, SAC, TD3
        from stable_baselines3.common.base_class import BaseAlgorithm

        model: BaseAlgorithm | None = None
        errors = []
        for algo in (PPO, SAC, TD3):
            try:
                model = algo.load(str(model_zip), device="cpu")
                break
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                errors.append(f"{algo.__name__}: {err}")
        if model is None:
            raise ValueError(f"{model_zip}: not a PPO, SAC or TD3 zip ({'; '.join(errors)})")
        self.model = model
        self.norm = None
        if vecnormalize is not None:
            with Path(vecnormalize).open("rb") as fh:
                self.norm = pickle.load(fh)  # VecNormalize.load needs a venv; stats suffice

    def predict(self, obs: np.ndarray) -> np.ndarray:
        o = np.asarray(obs, dtype=np.float32)
        if self.norm is not None:
            o = self.norm.normalize_obs(o)
        action, _ = self.model.predict(o, deterministic=True)
        return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)

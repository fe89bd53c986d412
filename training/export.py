"""Freeze a trained SB3 policy into one ONNX graph: normalisation + actor + clipping.

Folding VecNormalize's observation statistics into the graph means whoever serves the policy
(the evaluator, the live bridge through onnxruntime) feeds raw codec observations and gets
actions in [-1, 1]: nothing to keep in sync beside the file.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecNormalize


class FrozenPolicy(torch.nn.Module):
    """obs -> clip((obs - mean) / sqrt(var + eps)) -> deterministic actor -> clip to [-1, 1]."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: BaseAlgorithm, norm: VecNormalize | None) -> None:
        super().__init__()
        self.policy = model.policy
        dim = int(np.prod(model.observation_space.shape or (0,)))
        rms = norm.obs_rms if norm is not None and norm.norm_obs else None
        if norm is not None and isinstance(rms, RunningMeanStd):
            mean = rms.mean
            std = np.sqrt(rms.var + norm.epsilon)
            clip = float(norm.clip_obs)
        else:
            mean, std, clip = np.zeros(dim), np.ones(dim), float("inf")
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.clip = clip

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = (obs - self.mean) / self.std
        if np.isfinite(self.clip):
            x = torch.clamp(x, -self.clip, self.clip)
        action = self.policy._predict(x, deterministic=True)
        return torch.clamp(action, -1.0, 1.0)


def export_onnx(model: BaseAlgorithm, norm: VecNormalize | None) -> bytes:
    """The frozen policy as ONNX bytes (input `obs` (B, obs_dim) float32, output `action`)."""
    frozen = FrozenPolicy(model, norm).eval()
    dim = int(np.prod(model.observation_space.shape or (0,)))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "policy.onnx"
        torch.onnx.export(
            frozen,
            (torch.zeros(1, dim),),
            str(path),
            dynamo=False,
            input_names=["obs"],
            output_names=["action"],
            dynamic_axes={"obs": {0: "batch"}, "action": {0: "batch"}},
            opset_version=17,
        )
        return path.read_bytes()


def frozen_actions(model: BaseAlgorithm, norm: VecNormalize | None, obs: np.ndarray) -> Any:
    """What the exported graph should output, computed by torch: the parity reference."""
    frozen = FrozenPolicy(model, norm).eval()
    with torch.no_grad():
        return frozen(torch.as_tensor(obs, dtype=torch.float32)).numpy()

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

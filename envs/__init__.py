"""The microgrid environment: real LV grids, real profiles, exact fast AC power flow.

`MicrogridEnv` (registered as `Microgrid-v0`) for one grid, `MicrogridVectorEnv` for a natively
batched set of grids, `envs.codec` for the observation/action layout the bridge shares.

The environment classes load on first use: the bridge imports `envs.codec` on edge machines and
should not pay for the compiled kernels, the grid builder and the market it never runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gymnasium.envs.registration import register

from envs.errors import ActionError, MicrogridError, PowerFlowDiverged, ScenarioError

if TYPE_CHECKING:
    from envs.microgrid_env import MicrogridEnv
    from envs.scenario import Scenario, load_scenario

register(id="Microgrid-v0", entry_point="envs.microgrid_env:MicrogridEnv")

_LAZY = {
    "MicrogridEnv": "envs.microgrid_env",
    "Scenario": "envs.scenario",
    "load_scenario": "envs.scenario",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'envs' has no attribute {name!r}")


__all__ = [
    "ActionError",
    "MicrogridEnv",
    "MicrogridError",
    "PowerFlowDiverged",
    "Scenario",
    "ScenarioError",
    "load_scenario",
]

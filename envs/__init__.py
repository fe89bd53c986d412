"""The microgrid environment: real LV grids, real profiles, exact fast AC power flow.

`MicrogridEnv` (registered as `Microgrid-v0`) for one grid, `MicrogridVectorEnv` for a natively
batched set of grids, `envs.codec` for the observation/action layout the bridge shares.
"""

from gymnasium.envs.registration import register

from envs.errors import ActionError, MicrogridError, PowerFlowDiverged, ScenarioError
from envs.microgrid_env import MicrogridEnv
from envs.scenario import Scenario, load_scenario

register(id="Microgrid-v0", entry_point="envs.microgrid_env:MicrogridEnv")

__all__ = [
    "ActionError",
    "MicrogridEnv",
    "MicrogridError",
    "PowerFlowDiverged",
    "Scenario",
    "ScenarioError",
    "load_scenario",
]

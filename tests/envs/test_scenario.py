"""Scenario files: shipped ones validate; bad ones fail naming the field and allowed values."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from envs import ScenarioError, load_scenario
from envs.scenario import Scenario

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_scenarios_validate() -> None:
    files = sorted((ROOT / "configs" / "scenarios").glob("*.yaml"))
    assert len(files) >= 2
    for f in files:
        assert isinstance(load_scenario(f), Scenario)
    assert load_scenario(ROOT / "configs/scenarios/rural1.yaml") == Scenario()


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("grid: 1-LV-nowhere--0-sw\n", r"grid: .*allowed: 1-LV-rural1--0-sw"),
        ("battery:\n  soc_min: 0.9\n  soc_max: 0.2\n", r"battery: .*soc_min"),
        ("battery:\n  efficiency_charge: 1.5\n", r"battery\.efficiency_charge: .*less than or"),
        ("forecast:\n  mode: psychic\n", r"forecast\.mode: .*'perfect', 'noisy' or 'persistence'"),
        ("episode_steps: 0\n", r"episode_steps: .*greater than or equal to 1"),
        ("time_step_minutes: 5\n", r"time_step_minutes: .*15"),
        ("rewrad:\n  cost: 1\n", r"rewrad: Extra inputs are not permitted"),
        ("tariff:\n  import_periods:\n    - {start_hour: 0, end_hour: 12, price_per_kwh: 0.3}\n",
         r"tariff\.import_periods: .*cover hours 0-23"),
        ("- just\n- a list\n", r"expected a mapping"),
        ("grid: [unclosed\n", r"not valid YAML"),
    ],
)  # fmt: skip
def test_bad_scenario_files_name_the_field(tmp_path: Path, text: str, pattern: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ScenarioError, match=pattern):
        load_scenario(f)


def test_missing_file_is_a_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(tmp_path / "nope.yaml")


def test_prosumer_buses_must_exist() -> None:
    from envs.grid import build_grid

    with pytest.raises(ScenarioError, match=r"prosumers\.buses: \[999\]"):
        build_grid(Scenario(prosumers={"mode": "buses", "buses": [3, 999]}))


@pytest.mark.parametrize("code", ["1-LV-rural1--0-sw", "1-LV-urban6--0-sw"])
def test_a_grid_without_storage_has_a_background_storage_profile(code: str) -> None:
    """simbench's `--0-` cases have no storage units: the background storage is then zero in
    every slot (the compiled step reads it by slot), not an empty array."""
    from envs.grid import build_grid

    p = build_grid(Scenario(grid=code, name=code))
    assert p.background_storage_kw.shape == p.background_load_kw.shape
    assert not p.background_storage_kw.any()


def test_a_grid_cache_file_from_another_module_name_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache file whose classes live under a module this process cannot import (pickled by a
    renamed copy of the package sharing the cache) is rebuilt, not raised."""
    from envs.grid import build as grid_build

    monkeypatch.setenv("MICROGRID_CACHE_DIR", str(tmp_path))
    scenario = Scenario(prosumers={"max_prosumers": 3})
    grid_build._build_cached.cache_clear()
    grid_build.build_grid(scenario)
    (cached,) = tmp_path.glob("grid-*.pkl")
    cached.write_bytes(b"cnot_a_module_of_this_repo\nGridParams\n.")
    grid_build._build_cached.cache_clear()
    params = grid_build.build_grid(scenario)
    assert params.n_prosumer == 3
    assert pickle.loads(cached.read_bytes()).n_prosumer == 3
    grid_build._build_cached.cache_clear()

"""Fixtures for the bridge tests: a small synthetic site (no grid build), its keys and domain.

Building a simbench grid costs ~25 s here; the sans-I/O core needs only the codec and the battery
parameters, so these tests build them from a hand-made GridParams stand-in with two prosumers and
a community battery. The integration tests that need the real grid build it themselves.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest

from bridge.signing import ReadingDomain
from bridge.site import SiteManifest
from bridge.site_builder import build_site, device_key
from envs.params import BatteryParams, GridParams
from tests.bridge.helpers import CHAIN_ID, REGISTRY, SEED


def tiny_params() -> GridParams:
    """Two prosumers and a community battery; prices follow the default time-of-use bands."""
    price = np.full(96, 0.30)
    price[:28] = 0.22
    price[68:84] = 0.42
    batteries = BatteryParams(
        capacity_kwh=np.array([10.0, 8.0, 50.0]),
        power_kw=np.array([5.0, 4.0, 25.0]),
        efficiency_charge=np.full(3, 0.95),
        efficiency_discharge=np.full(3, 0.95),
        soc_min=np.full(3, 0.1),
        soc_max=np.full(3, 0.9),
        soc_initial=np.full(3, 0.5),
        fade_per_full_cycle=np.full(3, 1e-4),
        replacement_cost_per_kwh=np.full(3, 100.0),
    )
    return cast(
        GridParams,
        SimpleNamespace(
            grid_code="tiny",
            prosumer_names=("bus1", "bus2"),
            n_prosumer=2,
            has_community_battery=True,
            horizon=4,
            load_scale_kw=np.array([6.0, 4.0]),
            pv_scale_kw=np.array([5.0, 3.0]),
            import_price=price,
            feed_in_price=0.08,
            tod_multiplier=np.where(np.arange(96) >= 68, 1.3, 1.0),
            base_rate=0.25,
            stress_threshold=0.8,
            demand_reference_kw=40.0,
            batteries=batteries,
            signal_range=2.0,
            steps_per_day=96,
            n_days=366,
            dt_h=0.25,
        ),
    )


@pytest.fixture(scope="session")
def params() -> GridParams:
    return tiny_params()


@pytest.fixture(scope="session")
def site(params: GridParams) -> SiteManifest:
    return build_site(params, site="site1", seed=SEED)


@pytest.fixture(scope="session")
def domain() -> ReadingDomain:
    return ReadingDomain(CHAIN_ID, REGISTRY)


@pytest.fixture(scope="session")
def keys(site: SiteManifest) -> dict[str, bytes]:
    return {d.id: device_key(SEED, d.id) for d in site.devices}

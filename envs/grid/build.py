"""Scenario -> GridParams: load the simbench grid and its year of profiles, compile once.

Building takes about a second (simbench parsing dominates), so results are cached per scenario:
every environment of a process built from the same scenario shares one read-only GridParams.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from envs.errors import ScenarioError
from envs.params import BatteryParams, FloatArray, GridParams, IntArray
from envs.scenario import BatteryConfig, Scenario

STEPS_PER_DAY = 96


def load_net(grid_code: str) -> Any:
    """The simbench net for `grid_code`, read from the data shipped inside the simbench package."""
    import simbench

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return simbench.get_simbench_net(grid_code)
        except Exception as err:  # simbench raises bare exceptions for unknown codes
            raise ScenarioError(f"grid: simbench could not build {grid_code!r}: {err}") from err


def load_profiles(net: Any) -> dict[Any, Any]:
    """Absolute (MW / MVAr) time series per element, one row per 15-minute slot of the year."""
    import simbench

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(simbench.get_absolute_values(net, profiles_instead_of_study_cases=True))


def build_grid(scenario: Scenario) -> GridParams:
    """Compile `scenario` into GridParams (cached: equal scenarios share one object).

    The market section does not shape the grid, so scenarios that differ only there share it.
    """
    return _build_cached(scenario.model_dump_json(exclude={"market"}))


#: Bump when GridParams or the way it is built changes: old disk caches are then ignored.
CACHE_VERSION = 4


def cache_dir() -> Path:
    """Where compiled grids are kept between processes (`MICROGRID_CACHE_DIR` overrides)."""
    env = os.environ.get("MICROGRID_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "microgrid-management"


@functools.lru_cache(maxsize=8)
def _build_cached(scenario_json: str) -> GridParams:
    """Parsing simbench's CSVs takes seconds; the compiled arrays load in milliseconds."""
    key = hashlib.sha256(
        f"{CACHE_VERSION}|{metadata.version('simbench')}|{np.__version__}|{scenario_json}".encode()
    ).hexdigest()[:24]
    path = cache_dir() / f"grid-{key}.pkl"
    if path.is_file():
        try:
            with path.open("rb") as fh:
                cached = pickle.load(fh)
            if isinstance(cached, GridParams):
                return cached
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
            # A stale or torn cache file is rebuilt below; so is one pickled by a process that
            # imported these classes under another module name (a renamed copy of the package
            # sharing the cache directory), which unpickles to ModuleNotFoundError.
            pass
    # pandapower costs seconds to import: only a cache miss pays for it.
    from envs.grid.network import compile_network

    scenario = Scenario.model_validate_json(scenario_json)
    net = load_net(scenario.grid)
    network = compile_network(net)
    profiles = load_profiles(net)
    params = _assemble(scenario, net, network, profiles)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            pickle.dump(params, fh, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(path)  # atomic: concurrent test workers never read a half-written file
    except OSError:
        pass  # a read-only home only costs speed
    return params


def _prosumer_buses(scenario: Scenario, net: Any) -> list[int]:
    cfg = scenario.prosumers
    if cfg.mode == "buses":
        unknown = sorted(set(cfg.buses) - set(net.bus.index))
        if unknown:
            raise ScenarioError(
                f"prosumers.buses: {unknown} are not buses of {scenario.grid}; "
                f"allowed: {sorted(net.bus.index)}"
            )
        buses = list(dict.fromkeys(cfg.buses))
    else:
        # Households with PV or a battery are the ones with something to control; a grid at
        # expansion stage 0 may have neither, and then every load bus is a prosumer.
        def buses_of(table: str) -> set[int]:
            df = net[table]
            return {int(b) for b in df[df.in_service].bus}

        chosen = buses_of("storage") | buses_of("sgen") or buses_of("load")
        if not chosen:
            raise ScenarioError(f"grid: {scenario.grid} has no loads, PV or storage")
        buses = sorted(chosen)
    return buses[: cfg.max_prosumers]


def _padded(a: np.ndarray, pad: int) -> np.ndarray:
    """Wrap the first `pad` rows onto the end so forecasts at the year's end stay in range."""
    return np.concatenate([a, a[:pad]], axis=0)


def _battery_arrays(
    cfgs: list[BatteryConfig], caps: list[float], powers: list[float]
) -> BatteryParams:
    def col(name: str) -> FloatArray:
        return np.array([getattr(c, name) for c in cfgs], dtype=np.float64)

    return BatteryParams(
        capacity_kwh=np.array(caps, dtype=np.float64),
        power_kw=np.array(powers, dtype=np.float64),
        efficiency_charge=col("efficiency_charge"),
        efficiency_discharge=col("efficiency_discharge"),
        soc_min=col("soc_min"),
        soc_max=col("soc_max"),
        soc_initial=col("soc_initial"),
        fade_per_full_cycle=col("fade_per_full_cycle"),
        replacement_cost_per_kwh=col("replacement_cost_per_kwh"),
    )


def _split_days(scenario: Scenario, n_days: int) -> tuple[IntArray, IntArray, IntArray]:
    episode_days = -(-scenario.episode_steps // STEPS_PER_DAY)
    starts = np.arange(n_days - episode_days + 1, dtype=np.int64)
    perm = np.random.default_rng(scenario.split.seed).permutation(starts)
    n_test = max(1, round(scenario.split.test_fraction * starts.size))
    n_val = max(1, round(scenario.split.validation_fraction * starts.size))
    test = np.sort(perm[:n_test])
    val = np.sort(perm[n_test : n_test + n_val])
    train = np.sort(perm[n_test + n_val :])
    return train, val, test


def _assemble(scenario: Scenario, net: Any, network: Any, profiles: dict[Any, Any]) -> GridParams:
    from envs.grid.network import ppc_bus_of

    pq_pos = {int(b): i for i, b in enumerate(network.pq)}
    n_pq = network.pq.shape[0]
    base_kw = network.base_mva * 1000.0

    load_p = profiles[("load", "p_mw")].to_numpy(dtype=np.float64) * 1000.0
    load_q = profiles[("load", "q_mvar")].to_numpy(dtype=np.float64) * 1000.0
    sgen_p = profiles[("sgen", "p_mw")].to_numpy(dtype=np.float64) * 1000.0
    sto_p = profiles[("storage", "p_mw")].to_numpy(dtype=np.float64) * 1000.0
    n_t = load_p.shape[0]
    n_days = n_t // STEPS_PER_DAY
    # A grid without storage units (simbench's `--0-` cases) or PV has no profile rows for them
    # at all: give it n_t rows of no elements, so the background totals have a value every slot
    # (the compiled step reads them by slot; an empty array was read out of bounds).
    if sgen_p.shape[0] != n_t:
        sgen_p = np.zeros((n_t, len(net.sgen)))
    if sto_p.shape[0] != n_t:
        sto_p = np.zeros((n_t, len(net.storage)))
    # Out-of-service elements contribute nothing.
    load_p *= net.load.in_service.to_numpy()[None, :] * net.load.scaling.to_numpy()[None, :]
    load_q *= net.load.in_service.to_numpy()[None, :] * net.load.scaling.to_numpy()[None, :]
    sgen_p *= net.sgen.in_service.to_numpy()[None, :] * net.sgen.scaling.to_numpy()[None, :]
    sto_p *= net.storage.in_service.to_numpy()[None, :]

    def pq_of(table: str) -> np.ndarray:
        ppc = ppc_bus_of(net, net[table].bus.to_numpy())
        return np.array([pq_pos.get(int(b), -1) for b in ppc], dtype=np.int64)

    load_pq, sgen_pq, sto_pq = pq_of("load"), pq_of("sgen"), pq_of("storage")
    buses = _prosumer_buses(scenario, net)
    prosumer_pq = []
    for b in buses:
        pos = pq_pos.get(int(ppc_bus_of(net, np.array([b]))[0]), -1)
        if pos < 0:
            raise ScenarioError(
                f"prosumers: bus {b} is the slack or an isolated bus of {scenario.grid}"
            )
        prosumer_pq.append(pos)
    owned_load = net.load.bus.isin(buses).to_numpy()
    owned_sgen = net.sgen.bus.isin(buses).to_numpy()
    owned_sto = net.storage.bus.isin(buses).to_numpy()

    n_p = len(buses)
    p_load = np.zeros((n_t, n_p))
    q_load = np.zeros((n_t, n_p))
    p_pv = np.zeros((n_t, n_p))
    caps: list[float] = []
    powers: list[float] = []
    bat = scenario.battery
    for k, b in enumerate(buses):
        p_load[:, k] = load_p[:, (net.load.bus == b).to_numpy()].sum(axis=1)
        q_load[:, k] = load_q[:, (net.load.bus == b).to_numpy()].sum(axis=1)
        p_pv[:, k] = sgen_p[:, (net.sgen.bus == b).to_numpy()].sum(axis=1)
        sto = net.storage[(net.storage.bus == b) & net.storage.in_service]
        if len(sto):
            cap = float(sto.max_e_mwh.sum()) * 1000.0
            sn = sto.sn_mva.fillna(0.0).to_numpy() * 1000.0
            power = float(sn.sum()) if sn.sum() > 0 else cap * bat.c_rate
        else:
            cap = bat.default_capacity_kwh
            power = cap * bat.c_rate
        caps.append(cap)
        powers.append(power)
    cfgs: list[BatteryConfig] = [bat] * n_p
    battery_pq = list(prosumer_pq)
    cb = scenario.community_battery
    lv_bus = int(net.trafo.lv_bus.iloc[0]) if len(net.trafo) else int(net.bus.index[-1])
    if cb.enabled:
        cfgs.append(cb)
        caps.append(cb.capacity_kwh)
        powers.append(cb.power_kw)
        battery_pq.append(pq_pos[int(ppc_bus_of(net, np.array([lv_bus]))[0])])
    batteries = _battery_arrays(cfgs, caps, powers)

    # Background: everything the prosumers do not own, summed per pq bus.
    bg = np.zeros((n_t, n_pq), dtype=np.complex128)
    for values, q_values, pq_idx, owned, sign in (
        (load_p, load_q, load_pq, owned_load, -1.0),
        (sgen_p, None, sgen_pq, owned_sgen, 1.0),
        (sto_p, None, sto_pq, owned_sto, -1.0),
    ):
        keep = (~owned) & (pq_idx >= 0)
        if not keep.any():
            continue
        m = np.zeros((keep.size, n_pq))
        m[np.flatnonzero(keep), pq_idx[keep]] = 1.0
        s = values * sign
        if q_values is not None:
            s = s + 1j * (q_values * sign)
        bg += (s[:, keep] @ m[keep]) / base_kw
    # Elements at the slack bus do not load the feeder; leave them out of the totals too, so the
    # energy balance closes exactly.
    bg_load = load_p[:, ~owned_load & (load_pq >= 0)].sum(axis=1)
    bg_pv = sgen_p[:, ~owned_sgen & (sgen_pq >= 0)].sum(axis=1)
    bg_sto = sto_p[:, ~owned_sto & (sto_pq >= 0)].sum(axis=1)

    n_b = batteries.n
    inj = np.zeros((n_p + n_b, n_pq))
    inj[np.arange(n_p), prosumer_pq] = 1.0
    inj[n_p + np.arange(n_b), battery_pq] = 1.0

    slot_hours = np.arange(STEPS_PER_DAY) * 24 // STEPS_PER_DAY
    import_price = np.zeros(STEPS_PER_DAY)
    for period in scenario.tariff.import_periods:
        mask = (slot_hours >= period.start_hour) & (slot_hours < period.end_hour)
        import_price[mask] = period.price_per_kwh
    tod = np.asarray(scenario.seed_price.time_of_day_multiplier, dtype=np.float64)[slot_hours]
    net_load = p_load.sum(axis=1) - p_pv.sum(axis=1) + bg_load - bg_pv
    demand_ref = float(max(np.abs(net_load).max(), 1e-6))

    pad = scenario.episode_steps + scenario.forecast.horizon_steps + 1
    train, val, test = _split_days(scenario, n_days)
    f = scenario.flexible_load
    r = scenario.reward
    return GridParams(
        grid_code=scenario.grid,
        network=network,
        steps_per_day=STEPS_PER_DAY,
        dt_h=scenario.time_step_minutes / 60.0,
        n_days=n_days,
        episode_steps=scenario.episode_steps,
        prosumer_names=tuple(f"bus{b}" for b in buses),
        prosumer_pq=np.array(prosumer_pq, dtype=np.int64),
        prosumer_load_kw=_padded(p_load, pad),
        prosumer_load_kvar=_padded(q_load, pad),
        prosumer_pv_kw=_padded(p_pv, pad),
        load_scale_kw=np.maximum(p_load.max(axis=0), 1e-3),
        pv_scale_kw=np.maximum(p_pv.max(axis=0), 1e-3),
        background_s_pu=_padded(bg, pad),
        background_load_kw=_padded(bg_load, pad),
        background_pv_kw=_padded(bg_pv, pad),
        background_storage_kw=_padded(bg_sto, pad),
        background_load_pv_kw=_padded(np.stack([bg_load, bg_pv], axis=1), pad),
        batteries=batteries,
        battery_pq=np.array(battery_pq, dtype=np.int64),
        has_community_battery=cb.enabled,
        injection_map=inj,
        import_price=import_price,
        feed_in_price=scenario.tariff.feed_in_price_per_kwh,
        tod_multiplier=tod,
        base_rate=scenario.seed_price.base_rate,
        stress_threshold=scenario.seed_price.stress_threshold,
        signal_range=scenario.seed_price.signal_range,
        demand_reference_kw=demand_ref,
        curtailable_share=f.curtailable_share,
        shiftable_share=f.shiftable_share,
        rebound_per_step=f.rebound_per_step,
        discomfort_cost_per_kwh=f.discomfort_cost_per_kwh,
        unserved_penalty_per_kwh=f.unserved_penalty_per_kwh,
        horizon=scenario.forecast.horizon_steps,
        forecast_mode=scenario.forecast.mode,
        forecast_noise_std=scenario.forecast.noise_std,
        w_cost=r.cost,
        w_voltage=r.voltage_violation,
        w_thermal=r.thermal_violation,
        w_degradation=r.degradation,
        w_discomfort=r.discomfort,
        divergence_penalty=r.divergence_penalty,
        train_days=train,
        validation_days=val,
        test_days=test,
    )

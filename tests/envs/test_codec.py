"""The codec: one layout, invertible scaling, names for every entry, serialisable."""

from __future__ import annotations

import json

import numpy as np

from envs.codec import Codec


def test_names_match_dimensions_and_roundtrip_through_json(params) -> None:
    codec = Codec.from_params(params)
    assert len(codec.obs_names()) == codec.obs_dim
    assert len(codec.action_names()) == codec.act_dim
    again = Codec.from_dict(json.loads(json.dumps(codec.to_dict())))
    assert again.obs_names() == codec.obs_names()
    assert np.array_equal(again.scaling(), codec.scaling())


def test_encode_decode_observation_inverts_inside_bounds(params) -> None:
    codec = Codec.from_params(params)
    rng = np.random.default_rng(0)
    low, high = codec.bounds()
    scaled = rng.uniform(low, high, (2, codec.obs_dim))
    raw = codec.decode_observation(scaled)
    again = codec.encode(raw, 2)
    np.testing.assert_allclose(again, scaled, rtol=1e-5, atol=1e-5)


def test_encode_action_is_decoded_back_to_the_same_setpoints(params) -> None:
    codec = Codec.from_params(params)
    power = np.array(codec.battery_power_kw)
    kw = power * np.linspace(-1, 1, power.size)
    pv = np.linspace(0, 1, params.n_prosumer)
    dr = np.linspace(1, 0, params.n_prosumer)
    a = codec.encode_action(kw, pv, dr, price_multiplier=1.5)
    d = codec.decode_action(a[None])
    np.testing.assert_allclose(d.battery_kw[0], kw, rtol=1e-6)
    np.testing.assert_allclose(d.pv_curtailment[0], pv, atol=1e-7)
    np.testing.assert_allclose(d.dr_share[0], dr, atol=1e-7)
    np.testing.assert_allclose(d.price_multiplier[0], 1.5, rtol=1e-6)
    assert d.clipped[0] == 0

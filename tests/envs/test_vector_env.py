"""The natively batched env equals N single envs; the SB3 adapter behaves as SB3 expects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from envs import MicrogridEnv
from envs.kpis import MARKET_INFO
from envs.sb3_vec_env import SB3VecEnv
from envs.vector_env import MicrogridVectorEnv


def test_batched_env_equals_n_single_envs_step_for_step() -> None:
    n = 4
    venv = MicrogridVectorEnv(n)
    singles = [MicrogridEnv() for _ in range(n)]
    obs, _ = venv.reset(seed=100)
    expected = np.stack([e.reset(seed=100 + i)[0] for i, e in enumerate(singles)])
    assert np.array_equal(obs, expected)
    rng = np.random.default_rng(0)
    resets = 0
    for t in range(230):  # crosses two automatic resets
        actions = rng.uniform(-1.2, 1.2, (n, venv.codec.act_dim)).astype(np.float32)
        obs, reward, terminated, truncated, info = venv.step(actions)
        assert not terminated.any()
        for i, env in enumerate(singles):
            o, r, _, tr, inf = env.step(actions[i])
            assert r == reward[i] and tr == truncated[i], f"step {t}, env {i}"
            assert info["cost"][i] == inf["cost"]
            for key in MARKET_INFO:  # the market, settled per row, equals the single env's
                assert info[key][i] == inf[key], f"{key} differs at step {t}, env {i}"
            if tr:
                resets += 1
                assert np.array_equal(info["final_obs"][i], o)
                assert info["final_info"][i]["episode_kpis"] == inf["episode_kpis"]
                o, _ = env.reset()
            assert np.array_equal(obs[i], o), f"observation differs at step {t}, env {i}"
            # Ledger accounts too, including the restart of a row's accounts at its autoreset.
            assert np.array_equal(
                venv.exchange.ledger.credits()[i], env.exchange.ledger.credits()[0]
            )
    assert resets == 2 * n


def test_vector_env_declares_same_step_autoreset() -> None:
    from gymnasium.vector import AutoresetMode

    assert MicrogridVectorEnv.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP


def test_sb3_adapter_reports_truncation_and_terminal_observation() -> None:
    env = SB3VecEnv(3, seed=0)
    obs = env.reset()
    assert obs.shape == (3, env.observation_space.shape[0])
    for k in range(96):
        obs, _, dones, infos = env.step(np.zeros((3, env.action_space.shape[0])))
        assert dones.all() == (k == 95)
    for info in infos:
        assert info["TimeLimit.truncated"] is True
        assert info["terminal_observation"].shape == env.observation_space.shape
        assert not np.array_equal(info["terminal_observation"], obs[0])
        assert info["episode"]["l"] == 96


def test_ppo_learns_a_few_hundred_steps_on_the_adapter() -> None:
    torch.set_num_threads(1)
    env = SB3VecEnv(4, seed=0)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=128, n_epochs=1, seed=0, verbose=0)
    model.learn(256)
    action, _ = model.predict(env.reset(), deterministic=True)
    assert action.shape == (4, env.action_space.shape[0])


def test_threaded_batch_equals_the_one_core_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches from `PARALLEL_ROWS` up step on numba's threads; rows must not notice."""
    from envs import engine

    n = engine.PARALLEL_ROWS
    threaded, serial = MicrogridVectorEnv(n), MicrogridVectorEnv(n)
    assert np.array_equal(threaded.reset(seed=3)[0], serial.reset(seed=3)[0])
    rng = np.random.default_rng(0)
    for t in range(100):
        actions = rng.uniform(-1.2, 1.2, (n, threaded.codec.act_dim)).astype(np.float32)
        monkeypatch.setattr(engine, "PARALLEL_ROWS", n)
        obs, reward, _, truncated, info = threaded.step(actions)
        monkeypatch.setattr(engine, "PARALLEL_ROWS", n + 1)
        obs_s, reward_s, _, truncated_s, info_s = serial.step(actions)
        assert np.array_equal(obs, obs_s) and np.array_equal(reward, reward_s), f"step {t}"
        assert np.array_equal(truncated, truncated_s)
        for key in MARKET_INFO:
            assert np.array_equal(info[key], info_s[key]), f"{key} at step {t}"
    assert np.array_equal(threaded.exchange.ledger.credits(), serial.exchange.ledger.credits())


def test_step_threads_run_every_chunk_once_and_reraise_a_chunks_error() -> None:
    """The chunks of a threaded step are handed out once each; an error reaches the caller."""
    from envs.engine import CHUNK_ROWS, _StepThreads

    threads = _StepThreads()
    seen: list[tuple[int, int]] = []
    threads.run(2, 1000, lambda lo, hi: seen.append((lo, hi)))
    assert sorted(seen) == [(lo, min(1000, lo + CHUNK_ROWS)) for lo in range(0, 1000, CHUNK_ROWS)]

    def chunk(lo: int, hi: int) -> None:
        if lo == 2 * CHUNK_ROWS:
            raise ValueError("chunk 2")

    with pytest.raises(ValueError, match="chunk 2"):
        threads.run(2, 1000, chunk)


def test_step_threads_share_ends_when_the_work_is_done_and_reraise_a_helpers_error() -> None:
    """`share` runs the body on every thread and returns once `done()`; an error reaches the
    caller."""
    import threading

    from envs.engine import _StepThreads

    threads = _StepThreads()
    lock = threading.Lock()
    taken: list[int] = []
    left = list(range(50))

    def body() -> None:
        while True:
            with lock:
                if not left:
                    return
                item = left.pop()
            taken.append(item)

    threads.share(2, body, lambda: len(taken) == 50)
    assert sorted(taken) == list(range(50))

    def failing() -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("helper")

    with pytest.raises(ValueError, match="helper"):
        threads.share(2, failing, lambda: False)

"""Structured logs and the fallback's traces: one JSON object per line, and a slot the policy
could not decide says so in the log line and in the Prometheus counter alike."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import numpy as np

from bridge.config import BridgeConfig, Deployment
from bridge.logs import setup_json_logging
from bridge.policy_source import LoadedPolicy
from bridge.runner import BridgeRunner
from bridge.signing import ReadingDomain
from bridge.site import SiteManifest
from tests.bridge.helpers import GENESIS, NOW_MS, REGISTRY, birth, telemetry


class NaNPolicy:
    name = "nan"

    def predict(self, obs: np.ndarray) -> np.ndarray:
        return np.full(8, np.nan, dtype=np.float32)


class Broker:
    """Where the runner's publishes go instead of a broker (a dry run publishes none)."""

    def __init__(self) -> None:
        self.published: list[str] = []

    def publish_many(self, topics: list[str], payloads: list[bytes]) -> None:
        self.published.extend(topics)


def test_a_fallback_is_logged_as_json_and_counted(
    site: SiteManifest, domain: ReadingDomain, keys: dict[str, bytes], tmp_path: Path
) -> None:
    log_file = tmp_path / "bridge.log"
    setup_json_logging(file=log_file)
    try:
        dep = Deployment(chainId=31337, addresses={"DeviceRegistry": REGISTRY}, genesis=GENESIS,
                         slotSeconds=900)  # fmt: skip
        cfg = BridgeConfig(dry_run=True, metrics_port=None, log_file=log_file)
        runner = BridgeRunner(cfg, site, dep, LoadedPolicy(NaNPolicy(), "nan"))
        runner.link = Broker()  # type: ignore[assignment]
        core = runner.core
        for d in site.devices:
            core.handle(f"mgv1/site1/DBIRTH/{d.id}", birth(site, d.id), NOW_MS)
            msg = telemetry(site, domain, keys[d.id], d.id)
            core.handle(f"mgv1/site1/DDATA/{d.id}", json.dumps(msg).encode(), NOW_MS)
        runner.max_slots = None
        asyncio.run(runner._decide(1000, time.monotonic(), "ready"))
        runner.metrics.close()
    finally:  # the process's logging as it was: other tests capture the bridge's records
        logger = logging.getLogger("bridge")
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        logger.propagate, logger.level = True, logging.NOTSET
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    decided = [r for r in lines if r["msg"] == "slot decided"]
    assert len(decided) == 1, lines
    record = decided[0]
    assert {"ts", "level", "logger", "msg"} <= set(record)
    assert record["level"] == "warning" and record["logger"] == "bridge.run"
    assert record["fallback"] == "non_finite" and record["source"] == "fallback", record
    assert record["slot"] == 1000 and np.isfinite(record["shadow_action"]).all()
    counted = runner.metrics.registry.get_sample_value(
        "bridge_fallbacks_total", {"reason": "non_finite"}
    )
    assert counted == 1.0

"""A bridge-like process for the crash test: enqueue N mints through the outbox and drain.

Run as ``python -m tests.bridge.outbox_worker DB URL TOKEN N PAUSE``. It prints ``signed <key>``
and ``sent <key>`` as the outbox reaches each point and then sleeps PAUSE seconds there, so the
test can SIGKILL it inside the window it wants to test.
"""

from __future__ import annotations

import sys
import time

from web3 import Web3

from bridge.outbox import Outbox
from contracts.client import Chain
from tests.bridge.services import ANVIL_KEYS


def main() -> None:
    db, url, token, n, pause = sys.argv[1:6]
    chain = Chain(Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 5})))

    def hook(what: str) -> object:
        def report(key: str, _: object) -> None:
            print(f"{what} {key}", flush=True)
            time.sleep(float(pause))

        return report

    box = Outbox(
        db,
        chain,
        {"MockPaymentToken": token},
        ANVIL_KEYS[1],
        backoff_s=0.05,
        on_signed=hook("signed"),  # type: ignore[arg-type]
        on_sent=hook("sent"),  # type: ignore[arg-type]
    )
    recipient = chain.accounts[5]
    for i in range(int(n)):
        box.enqueue(f"mint:{i}", "MockPaymentToken", "mint", [recipient, 2**i], gas=100_000)
    drained = box.drain(timeout_s=60)
    print("drained" if drained else "timeout", flush=True)


if __name__ == "__main__":
    main()

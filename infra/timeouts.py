"""Bounded waits for calls whose library offers no reliable deadline of its own (MLflow's REST client retries
for minutes; a Prefect or tracking endpoint that accepts and never answers hangs a socket read)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class ServiceTimeout(TimeoutError):
    """A call to a service did not finish in time; the message names the endpoint and the setting."""


def call_with_timeout(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """`fn()` in a daemon thread; its result or exception, or ServiceTimeout after `timeout_s` seconds.

    A call that times out is abandoned (its thread is a daemon: it cannot keep the process alive)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=run, name=f"bounded: {what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise ServiceTimeout(f"{what}: no answer within {timeout_s:g} s (settings.service_timeout_s / "
                             "MOEFLOW_SERVICE_TIMEOUT_S); is the endpoint up and reachable?")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]

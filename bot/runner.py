"""Where slow work runs once the webhook has been acknowledged."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol


class Runner(Protocol):
    def submit(self, fn: Callable[..., object], *args: object) -> None: ...

    def shutdown(self) -> None: ...


class ThreadRunner:
    """A bounded thread pool: replies wait on the network, not the CPU."""

    def __init__(self, threads: int):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reply")

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        """Finish what was accepted, then stop."""
        self._pool.shutdown(wait=True)


class InlineRunner:
    """Runs the work inside the request: for tests and one-off scripts."""

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        fn(*args)

    def shutdown(self) -> None:
        pass

"""Signal handlers installed for the length of a `with` block (the CLI's and the engine's)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

Handler = Callable[[int, FrameType | None], Any]


@contextlib.contextmanager
def handling(signals: tuple[signal.Signals, ...], handler: Handler) -> Iterator[None]:
    """`handler` for `signals` inside the block, the previous handlers after it. Outside the
    main thread (a library calling latentlab from a thread), signals are left alone: Python
    only lets the main thread install handlers."""
    try:
        previous = {s: signal.signal(s, handler) for s in signals}
    except ValueError:
        previous = {}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)

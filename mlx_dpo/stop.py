"""Ctrl-C and SIGTERM during a run.

SIGTERM is what `kill`, job schedulers and a closing terminal send; it is treated like Ctrl-C.
Before training starts (loading, the reference pass) the first signal stops at once: there is
nothing to save. During training it asks the loop to finish the current update, save a
checkpoint and stop. Either way the first signal restores the system's default action, so a
second one ends the process at once, even in the middle of a long MLX computation (Python
handlers only run between bytecodes).
"""

from __future__ import annotations

import signal
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report


class Interrupted(RuntimeError):
    """The run stopped on a signal; `exit_code` is what the CLI exits with."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = EXIT_CODES.get(signum, 130)


class StopSignals:
    """`with StopSignals() as stop:` ... `stop.graceful = True` once there is work to save."""

    def __init__(self):
        self.signum: int | None = None
        self.graceful = False
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        for s in EXIT_CODES:  # a second signal: the default action, at once
            signal.signal(s, signal.SIG_DFL)
        if not self.graceful:
            raise Interrupted(f"stopped by {signal.Signals(signum).name} before training", signum)

    def __exit__(self, *exc) -> bool:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

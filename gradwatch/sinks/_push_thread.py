"""The Pushgateway pusher: pushes run on their own daemon thread, so a gateway that accepts the connection
and never answers costs the training thread nothing (it used to block ``optimizer.step()`` for the push
timeout on every attempt)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class PushThread:
    """Runs ``push_if_due`` whenever :meth:`request` was called since its last run (requests made while a
    push is running are merged into one), and ``push_final`` once at :meth:`finish`, then ends."""

    def __init__(self, push_if_due: Callable[[], None], push_final: Callable[[], None]) -> None:
        self._push_if_due = push_if_due
        self._push_final = push_final
        self._changed = threading.Condition()
        self._wanted = False
        self._final = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="gradwatch-push", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Ask for a push (returns at once)."""
        with self._changed:
            self._wanted = True
            self._changed.notify_all()

    def finish(self, timeout: float) -> bool:
        """The final push, then the thread ends; waits for both at most ``timeout`` seconds (an unanswering
        gateway then keeps only this daemon thread). True when it ended in time."""
        with self._changed:
            self._final = True
            self._changed.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def settle(self, timeout: float) -> bool:
        """Wait until no push is asked for or running (tests, and callers that want the push done)."""
        with self._changed:
            return self._changed.wait_for(lambda: not (self._wanted or self._busy), timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._wanted or self._final)
                final, self._wanted, self._busy = self._final, False, True
            try:
                (self._push_final if final else self._push_if_due)()
            except Exception:  # the push itself catches network errors: this is a bug, never training's
                logger.debug("gradwatch push failed unexpectedly", exc_info=True)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()
            if final:
                return

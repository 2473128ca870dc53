"""Keep a claim alive while long work runs: a small thread renews it at a third of its expiry."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType

from ckptd.core.errors import StoreError

log = logging.getLogger(__name__)


class Renewal:
    """``with Renewal(renew, ttl, "ckptd-renew-…") as r: work()``; ``r.lost`` once a renewal
    found the claim no longer ours (it expired and another process took it over)."""

    def __init__(self, renew: Callable[[], bool], ttl: timedelta, name: str) -> None:
        self._renew = renew
        self._every = ttl.total_seconds() / 3
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.lost = False

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            try:
                if not self._renew():
                    self.lost = True
                    return
            except StoreError as exc:  # e.g. locked for a moment: the claim has time left
                log.warning("could not renew a claim (retrying): %s", exc)

    def __enter__(self) -> Renewal:
        self._thread.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

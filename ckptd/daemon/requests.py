"""The serving side of the hand-off (``api/handoff.py``): ``ckptd evaluate``/``freeze`` asked
while a daemon or ``ckptd worker`` runs, and exports queued by daemons that leave them to
workers, are done here, in the process's warm worker, from its evaluation thread (so a requested
evaluation never races the backlog for the same job, and goes before it)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Collection
from datetime import datetime, timedelta
from typing import Any

from ckptd.api import evaluate as api_evaluate
from ckptd.api.evaluate import Evaluator
from ckptd.api.freeze import Freezer
from ckptd.api.handoff import REQUEST_TTL
from ckptd.api.renewal import Renewal
from ckptd.api.targets import NotConfigured, Target, watch_of
from ckptd.core.model import utcnow
from ckptd.daemon import metrics
from ckptd.store import requests
from ckptd.store.handle import Store
from ckptd.store.requests import EVALUATE, FREEZE, Claimed

log = logging.getLogger(__name__)

REQUEST_POLL = 0.5  # seconds between two looks for a request (one indexed read-only SELECT)


class Declined(Exception):
    """This daemon cannot do the request; the message says why (the CLI shows it)."""


class Stopping(Exception):
    """This process stops mid-request: the request goes back to the queue for another."""


class RequestServer:
    """``kinds``/``runs``: the request kinds and the runs (a callable, asked at each claim)
    this process serves; None: every one (a daemon)."""

    def __init__(
        self,
        store: Store,
        database: str,
        evaluator: Evaluator,
        freezer: Freezer,
        *,
        kinds: Collection[str] | None = None,
        runs: Callable[[], Collection[int]] | None = None,
        ttl: timedelta = REQUEST_TTL,
    ) -> None:
        self.store = store
        self.database = database  # the URL ``store`` was opened with (a reload does not change it)
        self.evaluator = evaluator  # its config is the daemon's current one (reloads update it)
        self.freezer = freezer
        self.kinds = kinds
        self.runs = runs  # a daemon: the runs it holds the leases of (another serves the others)
        self.ttl = ttl
        self.current: tuple[Claimed, datetime] | None = None  # the request in hand, since when
        self._poll_store: Store | None = None

    def _poll(self) -> bool:
        """Whether a request waits: read-only, so a look never takes the database's write lock."""
        if self._poll_store is None:
            self._poll_store = Store.open(self.database, readonly=True)
        return requests.any_claimable(self._poll_store, kinds=self.kinds)

    def _claim(self) -> Claimed | None:
        run_ids = self.runs() if self.runs is not None else None
        if run_ids is not None and not run_ids:
            return None
        return requests.claim_next(self.store, ttl=self.ttl, run_ids=run_ids, kinds=self.kinds)

    def serve_pending(self, stop: threading.Event) -> int:
        """Do every request waiting now; how many."""
        done = 0
        if not self._poll():
            return 0
        while not stop.is_set() and (claimed := self._claim()):
            renewal = Renewal(
                lambda: requests.renew(self.store, claimed.id, ttl=self.ttl),
                self.ttl,
                "ckptd-renew-request",
            )
            self.current = (claimed, utcnow())
            with renewal:
                try:
                    result = self._do(claimed, stop)
                except Stopping:
                    requests.release(self.store, claimed.id)
                    log.info("stopping: request %d goes back to the queue", claimed.id)
                    continue
                except (Declined, NotConfigured, api_evaluate.NotEvaluable) as exc:
                    requests.finish(self.store, claimed.id, result=None, error=str(exc))
                except Exception as exc:  # the CLI waiting on it hears why, not a lapsed claim
                    log.exception("request %d (%s) failed", claimed.id, claimed.kind)
                    requests.finish(
                        self.store, claimed.id, result=None, error=f"{type(exc).__name__}: {exc}"
                    )
                else:
                    requests.finish(self.store, claimed.id, result=result)
                finally:
                    self.current = None
            done += 1
        return done

    def _target(self, claimed: Claimed, section: str) -> Target:
        config = self.evaluator.config
        watch = watch_of(config, claimed.run.watch_path)
        if watch is None or getattr(watch, section) is None:
            raise Declined(
                f"its config ({config.source}) has no [watch.{section}] for run "
                f"{claimed.run.name}; reload it after editing (`systemctl reload ckptd` or "
                "SIGHUP)"
            )
        return Target(claimed.run, watch, claimed.checkpoint)

    def _do(self, claimed: Claimed, stop: threading.Event) -> dict[str, Any]:
        what = claimed.checkpoint.label if claimed.checkpoint else claimed.run.name
        if claimed.options.get("scheduled"):
            log.info("%s of %s queued by a daemon's schedule", claimed.kind, what)
        else:
            log.info("%s of %s requested by `ckptd %s`", claimed.kind, what, claimed.kind)
        if claimed.kind == EVALUATE:
            return self._evaluate(claimed, stop)
        if claimed.kind == FREEZE:
            target = self._target(claimed, "freeze")
            outcome = self.freezer.freeze_run(
                target.run,
                target.watch,
                target.checkpoint,
                force=bool(claimed.options.get("force")),
                # queued by a daemon's schedule: a failed export waits out its backoff
                honour_backoff=bool(claimed.options.get("scheduled")),
            )
            if stop.is_set() and outcome.status == "failed":
                raise Stopping  # (its worker was stopped: the freezer redoes it, so may another)
            if outcome.status in ("published", "failed"):
                metrics.export(outcome.status, outcome.seconds)
            return dataclasses.asdict(outcome)
        raise Declined(f"unknown request kind {claimed.kind!r} (a newer ckptd asked?)")

    def _evaluate(self, claimed: Claimed, stop: threading.Event) -> dict[str, Any]:
        target = self._target(claimed, "evaluate")
        evaluation = api_evaluate.start(
            self.evaluator, target, again=bool(claimed.options.get("again")), stop=stop
        )
        result: dict[str, Any] = {
            "total": evaluation.total,
            "waiting": [api_evaluate.waiting_json(w) for w in evaluation.waiting],
            "outcomes": [],
        }
        requests.progress(self.store, claimed.id, result, ttl=self.ttl)
        for outcome in evaluation.outcomes:
            metrics.evaluation(outcome.status, outcome.seconds)
            result["outcomes"].append(outcome.to_json())
            requests.progress(self.store, claimed.id, result, ttl=self.ttl)
        if stop.is_set():
            raise Stopping
        return result

    def close(self) -> None:
        if self._poll_store is not None:
            self._poll_store.close()

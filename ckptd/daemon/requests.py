"""The daemon's side of the hand-off (``api/handoff.py``): ``ckptd evaluate``/``freeze`` asked
while it runs are done here, in its warm worker, from the evaluation thread (so a requested
evaluation never races the backlog for the same job, and goes before it)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Collection
from typing import Any

from ckptd.api import evaluate as api_evaluate
from ckptd.api.evaluate import Evaluator
from ckptd.api.freeze import Freezer
from ckptd.api.handoff import REQUEST_TTL
from ckptd.api.renewal import Renewal
from ckptd.api.targets import NotConfigured, Target, watch_of
from ckptd.daemon import metrics
from ckptd.store import requests
from ckptd.store.handle import Store
from ckptd.store.requests import EVALUATE, FREEZE, Claimed

log = logging.getLogger(__name__)

REQUEST_POLL = 0.5  # seconds between two looks for a request (one indexed read-only SELECT)


class Declined(Exception):
    """This daemon cannot do the request; the message says why (the CLI shows it)."""


class RequestServer:
    def __init__(
        self,
        store: Store,
        database: str,
        evaluator: Evaluator,
        freezer: Freezer,
        runs: Callable[[], Collection[int]] | None = None,
    ) -> None:
        self.store = store
        self.runs = runs  # the runs whose requests this daemon serves (its leases); None: all
        self.database = database  # the URL ``store`` was opened with (a reload does not change it)
        self.evaluator = evaluator  # its config is the daemon's current one (reloads update it)
        self.freezer = freezer
        self._poll_store: Store | None = None

    def _poll(self) -> bool:
        """Whether a request waits: read-only, so a look never takes the database's write lock."""
        if self._poll_store is None:
            self._poll_store = Store.open(self.database, readonly=True)
        return requests.any_claimable(self._poll_store)

    def serve_pending(self, stop: threading.Event) -> int:
        """Do every request waiting now; how many."""
        done = 0
        if not self._poll():
            return 0
        while not stop.is_set() and (claimed := self._claim_next()):
            renewal = Renewal(
                lambda: requests.renew(self.store, claimed.id, ttl=REQUEST_TTL),
                REQUEST_TTL,
                "ckptd-renew-request",
            )
            with renewal:
                try:
                    result = self._do(claimed, stop)
                except (Declined, NotConfigured, api_evaluate.NotEvaluable) as exc:
                    requests.finish(self.store, claimed.id, result=None, error=str(exc))
                except Exception as exc:  # the CLI waiting on it hears why, not a lapsed claim
                    log.exception("request %d (%s) failed", claimed.id, claimed.kind)
                    requests.finish(
                        self.store, claimed.id, result=None, error=f"{type(exc).__name__}: {exc}"
                    )
                else:
                    requests.finish(self.store, claimed.id, result=result)
            done += 1
        return done

    def _claim_next(self) -> Claimed | None:
        """The next request of a run this daemon holds (another daemon serves the others)."""
        if self.runs is None:
            return requests.claim_next(self.store, ttl=REQUEST_TTL)
        held = self.runs()
        return requests.claim_next(self.store, ttl=REQUEST_TTL, run_ids=held) if held else None

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
            )
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
        requests.progress(self.store, claimed.id, result, ttl=REQUEST_TTL)
        for outcome in evaluation.outcomes:
            metrics.evaluation(outcome.status, outcome.seconds)
            result["outcomes"].append(outcome.to_json())
            requests.progress(self.store, claimed.id, result, ttl=REQUEST_TTL)
        if stop.is_set():
            raise Declined("it is stopping; run the command again")
        return result

    def close(self) -> None:
        if self._poll_store is not None:
            self._poll_store.close()

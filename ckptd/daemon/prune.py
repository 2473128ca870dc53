"""Acting on a retention plan: two-phase, resumable deletion, then a state file TF can still use.

Phase 1 commits ``pruning`` for every checkpoint to delete (the intent); phase 2 removes the
files recorded for each through :mod:`ckptd.daemon.fsops`; phase 3 commits ``pruned`` with the
reason. A crash anywhere leaves rows in ``pruning``, which :meth:`Pruner.resume` finishes at the
next start. Then the run's ``checkpoint`` state file is rewritten so that
``tf.train.latest_checkpoint`` and a restarted ``CheckpointManager`` see only what exists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, insert, select, update

from ckptd import statefile
from ckptd.config import WatchConfig
from ckptd.daemon import fsops, metrics
from ckptd.model import COMPLETE, PRUNED, PRUNING, Checkpoint, Run, utcnow
from ckptd.policy import Plan, Rules, plan_prune
from ckptd.store import queries
from ckptd.store.db import session_scope
from ckptd.store.tables import ActionRow, CheckpointRow, RunRow, table_of

log = logging.getLogger(__name__)


def rules_for(watch: WatchConfig) -> Rules | None:
    r = watch.retain
    if r is None:
        return None
    return Rules(
        keep_last=r.keep_last,
        keep_best=r.keep_best,
        keep_every=r.keep_every,
        keep_every_steps=r.keep_every_steps,
        min_age=r.min_age,
        metric=watch.best.metric,
        mode=watch.best.mode,
    )


def describe(rules: Rules) -> str:
    parts = []
    if rules.keep_last:
        parts.append(f"keep_last={rules.keep_last}")
    if rules.keep_best:
        parts.append(f"keep_best={rules.keep_best}")
    if rules.keep_every:
        parts.append(f"keep_every={rules.keep_every}")
    if rules.keep_every_steps:
        parts.append(f"keep_every_steps={rules.keep_every_steps}")
    return "not kept by " + (", ".join(parts) or "any rule")


@dataclass
class PruneResult:
    run: str
    plan: Plan
    history: list[Checkpoint]
    pruned: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    dry_run: bool = False


class Pruner:
    """Deletes what a plan says, and nothing else. ``on_states`` keeps a reconciler's cache true."""

    def __init__(
        self, engine: Engine, on_states: Callable[[dict[str, str]], None] | None = None
    ) -> None:
        self.engine = engine
        self.on_states = on_states

    def plan(
        self, run: Run, watch: WatchConfig, rules: Rules | None = None
    ) -> tuple[Plan, list[Checkpoint]]:
        rules = rules or rules_for(watch) or Rules()
        with session_scope(self.engine) as s:
            history = queries.checkpoints(s, run_id=run.id)
        return plan_prune(history, rules, utcnow()), history

    def prune_run(self, run: Run, watch: WatchConfig, *, dry_run: bool = False) -> PruneResult:
        rules = rules_for(watch)
        if rules is None:
            # No [watch.retain] section: nothing is ever deleted.
            return PruneResult(run.name, Plan({}, ()), [], dry_run=True)
        plan, history = self.plan(run, watch, rules)
        result = PruneResult(
            run.name,
            plan,
            history,
            dry_run=dry_run,
        )
        if result.dry_run:
            return result
        if not plan.delete:
            # A live TF2 CheckpointManager rewrites the state file from its own list at every
            # save, putting back entries ckptd pruned: repair it on every pass (cheap: a read
            # and a compare; it writes only on change).
            self._rewrite_state_file(Path(run.path), set())
            return result
        reason = describe(rules)
        ids = [c.id for c in plan.delete]
        with session_scope(self.engine) as s:  # phase 1: intent
            s.execute(
                update(CheckpointRow)
                .where(CheckpointRow.id.in_(ids), CheckpointRow.state == COMPLETE)
                .values(state=PRUNING, reason=reason)
            )
            intended = set(
                s.scalars(
                    select(CheckpointRow.id).where(
                        CheckpointRow.id.in_(ids), CheckpointRow.state == PRUNING
                    )
                )
            )
        self._notify({c.prefix: PRUNING for c in plan.delete if c.id in intended})
        self._finish(
            [c for c in plan.delete if c.id in intended],
            Path(run.path),
            Path(run.watch_path),
            reason,
            result,
        )
        return result

    def resume(self) -> int:
        """Finish deletions a crash interrupted (rows left in ``pruning``)."""
        with session_scope(self.engine) as s:
            rows = s.execute(
                select(CheckpointRow.id, RunRow.path, RunRow.watch_path, CheckpointRow.reason)
                .join(RunRow, RunRow.id == CheckpointRow.run_id)
                .where(CheckpointRow.state == PRUNING)
            ).all()
            by_run: dict[tuple[str, str], list[int]] = {}
            reasons: dict[tuple[str, str], str] = {}
            for cid, path, watch_path, reason in rows:
                by_run.setdefault((path, watch_path), []).append(cid)
                reasons[(path, watch_path)] = reason or "pruned"
            items = {key: queries.checkpoints(s, ids=ids) for key, ids in by_run.items()}
            # A crash after "pruned" was committed but before the state file was rewritten
            # leaves entries for deleted checkpoints there: fix every run that has pruned ones.
            pruned_runs = set(
                s.scalars(
                    select(RunRow.path)
                    .join(CheckpointRow, CheckpointRow.run_id == RunRow.id)
                    .where(CheckpointRow.state == PRUNED)
                    .distinct()
                )
            )
        for (path, watch_path), ckpts in items.items():
            result = PruneResult(Path(path).name, Plan({}, ()), [])
            self._finish(
                ckpts,
                Path(path),
                Path(watch_path),
                reasons[(path, watch_path)] + " (resumed after restart)",
                result,
            )
            log.info("resumed pruning of %d checkpoint(s) in %s", len(result.pruned), path)
        for path in pruned_runs - {p for p, _ in items}:
            self._rewrite_state_file(Path(path), set())
        return sum(len(v) for v in items.values())

    # -------------------------------------------------------------- internals

    def _finish(
        self, ckpts: list[Checkpoint], run_dir: Path, root: Path, reason: str, result: PruneResult
    ) -> None:
        done: list[tuple[Checkpoint, fsops.Removal]] = []
        failed: list[tuple[Checkpoint, fsops.Removal]] = []
        removals = fsops.remove_groups(root, run_dir, [list(c.files) for c in ckpts])  # phase 2
        for c, removal in zip(ckpts, removals, strict=True):
            (done if removal.ok else failed).append((c, removal))
        now = utcnow()
        with session_scope(self.engine) as s:  # phase 3: the result
            if done:
                s.execute(
                    update(CheckpointRow)
                    .where(CheckpointRow.id.in_([c.id for c, _ in done]))
                    .values(state=PRUNED, gone_at=now, reason=reason)
                )
                s.connection().execute(
                    insert(table_of(ActionRow)),
                    [
                        dict(
                            at=now,
                            kind="pruned",
                            run_id=c.run_id,
                            checkpoint_id=c.id,
                            subject=c.prefix,
                            reason=reason,
                            detail={
                                "step": c.step,
                                "files": r.removed,
                                "already_missing": r.missing,
                                "bytes": r.bytes_freed,
                            },
                        )
                        for c, r in done
                    ],
                )
            for c, r in failed:
                # Leave it recorded as present: some of its files could not be removed.
                s.execute(
                    update(CheckpointRow).where(CheckpointRow.id == c.id).values(state=COMPLETE)
                )
                s.execute(
                    insert(ActionRow).values(
                        at=now,
                        kind="prune_failed",
                        run_id=c.run_id,
                        checkpoint_id=c.id,
                        subject=c.prefix,
                        reason="; ".join(r.errors),
                        detail={"removed": r.removed},
                    )
                )
        self._notify({c.prefix: PRUNED for c, _ in done} | {c.prefix: COMPLETE for c, _ in failed})
        result.pruned += [c.label for c, _ in done]
        result.failed += [f"{c.label}: {'; '.join(r.errors)}" for c, r in failed]
        result.bytes_freed += sum(r.bytes_freed for _, r in done)
        metrics.pruned(len(done), sum(r.bytes_freed for _, r in done))
        if done:
            self._rewrite_state_file(run_dir, {Path(c.prefix) for c, _ in done})
        for name in fsops.remove_stale_temp_dirs(root, run_dir):
            log.info("removed stale TensorFlow temp directory %s/%s", run_dir, name)

    def _newest_complete(self, run_dir: Path) -> str | None:
        with session_scope(self.engine) as s:
            return s.scalar(
                select(CheckpointRow.prefix)
                .join(RunRow, RunRow.id == CheckpointRow.run_id)
                .where(
                    RunRow.path == str(run_dir),
                    CheckpointRow.state == COMPLETE,
                    CheckpointRow.format.in_(("tf1", "tf2")),
                )
                .order_by(CheckpointRow.step.desc(), CheckpointRow.id.desc())
                .limit(1)
            )

    def _rewrite_state_file(self, run_dir: Path, removed: set[Path]) -> None:
        """Drop pruned (and otherwise vanished) entries; keep paths' style and TF2 timestamps."""
        state = statefile.read(run_dir)
        if state is None:
            return
        vanished = {
            state.resolve(run_dir, p)
            for p in state.all_model_checkpoint_paths
            if not _exists(state.resolve(run_dir, p))
        }
        new = statefile.without(state, run_dir, removed | vanished)
        if not new.all_model_checkpoint_paths:
            # TF refuses a state file with no latest checkpoint (latest_checkpoint and
            # CheckpointManager raise): point it at the newest checkpoint that exists.
            newest = self._newest_complete(run_dir)
            if newest is None:
                return
            name = Path(newest).name
            new = statefile.CheckpointState(name, [name], [], state.last_preserved_timestamp)
        if new != state:
            try:
                statefile.write_atomic(run_dir, new)
            except OSError as exc:
                log.error("could not rewrite %s/checkpoint: %s", run_dir, exc)

    def _notify(self, states: dict[str, str]) -> None:
        if self.on_states and states:
            self.on_states(states)


def _exists(prefix: Path) -> bool:
    return prefix.with_name(prefix.name + ".index").exists() or prefix.exists()


def run_for(engine: Engine, name_or_path: str) -> Run:
    with session_scope(engine) as s:
        return queries.resolve_run(s, name_or_path)


def all_runs(engine: Engine) -> list[Run]:
    with session_scope(engine) as s:
        return queries.runs(s)

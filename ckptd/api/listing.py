"""What `ckptd ls`, `best` and `show` show: checkpoints with their best mark and why retention
keeps them, a run's ranking by a metric, and the variables saved in a checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckptd.api import objstores
from ckptd.api.targets import watch_of
from ckptd.config import Config, WatchConfig
from ckptd.core.model import COMPLETE, CORRUPT, PRUNING, Checkpoint, Run, utcnow
from ckptd.core.ranking import ranked, select_best
from ckptd.core.retention import plan as plan_prune
from ckptd.io.objstore import is_object_url
from ckptd.store import reads, runs
from ckptd.store.handle import Store

if TYPE_CHECKING:
    from ckptd.io.formats.tensorbundle import TensorInfo

# What `ckptd ls` lists unless asked for states (gone and pruned ones are history).
LISTED_STATES = (COMPLETE, CORRUPT, PRUNING)


class NoMetric(ValueError):
    """Ranking was asked for, but neither the config nor the caller names a metric."""


class Unreadable(Exception):
    """A checkpoint's index cannot be read; the message says why and what to check."""


@dataclass(frozen=True)
class Listing:
    checkpoints: list[Checkpoint]
    best: frozenset[int] = frozenset()  # ids: the best of each run by its watch's metric
    # ids -> why [watch.retain] keeps it ([]: the next prune deletes it); only runs with a policy
    kept_because: dict[int, list[str]] = field(default_factory=dict)
    best_metrics: tuple[str, ...] = ()  # the [watch.best] metrics of the listed runs


def listing(
    store: Store,
    config: Config,
    run: str | None = None,
    states: Sequence[str] | None = LISTED_STATES,
) -> Listing:
    """The checkpoints of ``run`` (a name or an absolute path; every run if None) in ``states``
    (None: all), by run and step."""
    run_id = runs.find_run(store, run).id if run else None
    items = reads.load_checkpoints(store, run_id=run_id, states=states)
    if not items:
        return Listing([])
    watches = {
        r.id: w for r in runs.all_runs(store) if (w := watch_of(config, r.watch_path)) is not None
    }
    listed = {c.run_id for c in items}
    return Listing(
        items,
        _best_ids(items, watches),
        _retention_reasons(store, {i: w for i, w in watches.items() if i in listed}),
        tuple(
            dict.fromkeys(
                w.best.metric for i, w in sorted(watches.items()) if i in listed and w.best.metric
            )
        ),
    )


def _best_ids(items: Sequence[Checkpoint], watches: dict[int, WatchConfig]) -> frozenset[int]:
    by_run: dict[int, list[Checkpoint]] = {}
    for c in items:
        by_run.setdefault(c.run_id, []).append(c)
    best = set()
    for run_id, of_run in by_run.items():
        watch = watches.get(run_id)
        if watch is None or not watch.best.metric:
            continue
        b = select_best(of_run, watch.best.metric, watch.best.mode)
        if b is not None:
            best.add(b.id)
    return frozenset(best)


def _retention_reasons(store: Store, watches: dict[int, WatchConfig]) -> dict[int, list[str]]:
    """Why each checkpoint of these runs survives its [watch.retain] policy; the whole history
    of every run with one, in one read."""
    from ckptd.api.prune import rules_for

    rules = {run_id: r for run_id, w in watches.items() if (r := rules_for(w)) is not None}
    if not rules:
        return {}
    histories: dict[int, list[Checkpoint]] = {run_id: [] for run_id in rules}
    for c in reads.load_checkpoints(store, run_ids=list(rules)):
        histories[c.run_id].append(c)
    out: dict[int, list[str]] = {}
    now = utcnow()
    for run_id, history in histories.items():
        plan = plan_prune(history, rules[run_id], now)
        out.update({c.id: [] for c in plan.delete})  # the next prune deletes these
        out.update({cid: list(reasons) for cid, reasons in plan.keep.items()})
    return out


@dataclass(frozen=True)
class Ranking:
    run: Run
    metric: str
    mode: str
    best: list[Checkpoint]  # the best first, at most ``top``
    complete: list[Checkpoint]  # every complete checkpoint of the run (what was ranked)


def best(
    store: Store,
    config: Config,
    run: str,
    metric: str | None = None,
    mode: str | None = None,
    top: int = 1,
) -> Ranking:
    """The ``top`` best complete checkpoints of ``run`` by ``metric`` (default: its watch's),
    ties to the newer step; NaN and missing values never rank."""
    r = runs.find_run(store, run)
    watch = watch_of(config, r.watch_path)
    metric = metric or (watch.best.metric if watch else None)
    mode = mode or (watch.best.mode if watch else "max")
    if not metric:
        raise NoMetric(
            f"no metric configured for run {r.name!r}: set [watch.best] metric in the config "
            "or pass --metric NAME"
        )
    items = reads.load_checkpoints(store, run_id=r.id, states=[COMPLETE])
    return Ranking(r, metric, mode, ranked(items, metric, mode)[:top], items)


@dataclass(frozen=True)
class Variables:
    prefix: str
    tensors: list[TensorInfo]
    note: str | None = None  # what could not be listed, and why


KERAS_SUFFIXES = (".keras", ".weights.h5")


def show(
    checkpoint: str, open_store: Callable[[], Store], config: Callable[[], Config] | None = None
) -> Variables:
    """The variables saved in ``checkpoint``: a prefix path read where it is, or a recorded
    checkpoint (prefix or ``RUN@STEP``) read from its watch root, never through a symlink below
    it, or from its object store (with the endpoint of ``config``'s watch it is under). Read
    from the .index file (a Keras file: its HDF5 weights); the database is opened only for a
    recorded one."""
    keras = checkpoint.endswith(KERAS_SUFFIXES)
    prefix, root = checkpoint, os.path.dirname(os.path.abspath(checkpoint))
    if not os.path.exists(checkpoint if keras else checkpoint + ".index"):
        record, watch_root = reads.locate_checkpoint(open_store(), checkpoint)
        prefix, root = record.prefix, watch_root or root
        keras = record.format.startswith("keras")
    if is_object_url(prefix):
        if keras:
            raise Unreadable(
                f"{prefix}: the weights of a Keras file on an object store are not listed here; "
                "download it and run `ckptd show FILE`"
            )
        if config is not None:
            objstores.configure(config().watches)
        return _object_bundle_tensors(prefix)
    return _keras_weights(root, prefix) if keras else _bundle_tensors(root, prefix)


def _object_bundle_tensors(prefix: str) -> Variables:
    from ckptd.io import safeio
    from ckptd.io.formats import INDEX_MAX_BYTES
    from ckptd.io.objstore import StoreError
    from ckptd.io.objstore.failures import NOT_FOUND

    def read() -> bytes:
        """The index object, its failures as a local read's (one wording for both)."""
        index = prefix + ".index"
        try:
            data = objstores.store_for(index).read(objstores.key_of(index), 0, INDEX_MAX_BYTES + 1)
        except StoreError as exc:
            raise (FileNotFoundError if exc.kind == NOT_FOUND else OSError)(str(exc)) from None
        if len(data) > INDEX_MAX_BYTES:
            raise safeio.TooLarge(index)
        return data

    return _index_tensors(prefix, read)


def _bundle_tensors(root: str, prefix: str) -> Variables:
    from ckptd.io import safeio
    from ckptd.io.formats import INDEX_MAX_BYTES

    return _index_tensors(
        prefix, lambda: safeio.read_under(root, prefix + ".index", INDEX_MAX_BYTES)
    )


def _index_tensors(prefix: str, read: Callable[[], bytes]) -> Variables:
    """The tensors listed by ``prefix``'s index, whose bytes ``read`` returns (from a file or
    an object): what went wrong said the same way wherever the index lies."""
    from ckptd.io import safeio
    from ckptd.io.formats import INDEX_MAX_BYTES
    from ckptd.io.formats.tensorbundle import BundleError, list_tensors

    index = prefix + ".index"
    try:
        return Variables(prefix, list_tensors(read()))
    except FileNotFoundError:
        raise Unreadable(
            f"{index} does not exist (was it pruned or deleted? see `ckptd events`)"
        ) from None
    except safeio.TooLarge:
        raise Unreadable(
            f"{index} is larger than {INDEX_MAX_BYTES >> 20} MiB, which no real checkpoint index "
            "is; not read"
        ) from None
    except OSError as exc:  # a FIFO or a symlink, a symlinked directory, permissions, a server
        raise Unreadable(f"{index} cannot be read: {exc.strerror or exc}") from None
    except BundleError as exc:
        raise Unreadable(f"{index} cannot be read: {exc}") from None


def _keras_weights(root: str, path: str) -> Variables:
    """The weights of a ``.keras`` archive or a ``.weights.h5`` file, opened safely under
    ``root`` and read in place (seeks, not the whole file)."""
    from ckptd.io import safeio
    from ckptd.io.formats.kerasweights import NO_H5PY, KerasUnreadable, list_weights

    directory, name = os.path.split(os.path.abspath(path))
    try:
        with safeio.open_dir_under(root, directory) as dir_fd:
            fd, _st = safeio.open_regular(name, dir_fd)
            with os.fdopen(fd, "rb") as fh:
                listed = list_weights(fh, name)
    except FileNotFoundError:
        raise Unreadable(
            f"{path} does not exist (was it pruned or deleted? see `ckptd events`)"
        ) from None
    except OSError as exc:  # a FIFO or a symlink, a symlinked directory, permissions …
        raise Unreadable(f"{path} cannot be read: {exc.strerror or exc}") from None
    except KerasUnreadable as exc:
        raise Unreadable(f"{path} cannot be read: {exc}") from None
    except ModuleNotFoundError:
        raise Unreadable(f"{path}: {NO_H5PY}") from None
    return Variables(path, listed.tensors, listed.note)

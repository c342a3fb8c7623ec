"""Where a search keeps its trials: optuna's storages, and how several processes share one study.

A study holds N trial *slots* from the start: the process that creates it enqueues N waiting
trials (grid points, or empty ones the sampler fills in), and every process takes one at a time
with the storage's atomic WAITING -> RUNNING change. So two processes (or machines) on one
PostgreSQL study finish N trials together and none is run twice; a rerun of the same command
takes the slots that are left.

A trial whose search process died (kill -9, a crash, a lost machine) stays RUNNING in the
storage. It is found dead when its owner's process is gone (same machine: pid + start time) or,
on a database, when its heartbeat is older than GRACE_S (another machine). It is then marked
FAIL and a copy with the same parameters is enqueued (`retry_of` names the dead one), so the
trial is neither lost nor counted twice.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.trial import FrozenTrial, TrialState

from tunesmith.errors import TunesmithError

HEARTBEAT_S = 10  # a running trial's owner touches it this often (databases)
GRACE_S = 60  # ... and it is dead after this long without a touch
MAX_RETRIES = 2  # a trial that kills its search again and again fails for good after this many retries
READY_WAIT_S = 120  # a process that finds the study being created waits this long for its slots
TRIALS_ATTR, SETUP_ATTR, STRATEGY_ATTR = "tunesmith:trials", "tunesmith:setup", "tunesmith:strategy"


def open_storage(url: str | None, search_dir: Path) -> BaseStorage:
    """An optuna storage for `url`: None -> a SQLite file in the search folder; sqlite:///FILE or a
    .db/.sqlite path; postgresql://... (through psycopg 3); FILE.log / journal:FILE (optuna's journal file).

    Raises:
        TunesmithError: an unknown form, or a database that does not answer.
    """
    given = url
    if url is None:
        search_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(search_dir / 'study.db').absolute()}"
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:")).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.endswith((".db", ".sqlite", ".sqlite3")) and "://" not in url:
        Path(url).absolute().parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{Path(url).absolute()}"
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]  # SQLAlchemy's default driver is psycopg2
    if "://" not in url:
        raise TunesmithError(f"--storage {url}: give sqlite:///FILE, a FILE.db, postgresql://USER@HOST:PORT/DB "
                             "or a journal FILE.log")
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in optuna since 2.8; pinned 5.0.0
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                  heartbeat_stale_trial_callback=retry_dead_trial)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Two processes starting on a fresh database both create optuna's tables; PostgreSQL lets
            # one win and the other fails on a duplicate type or version row. The tables exist now,
            # so a second try finds them (the search's other processes start at the same moment).
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ArgumentError, ModuleNotFoundError) as e:
            raise TunesmithError(f"--storage {given or url}: cannot open it: {str(e).splitlines()[0]}") from None
    raise AssertionError("unreachable")


def describe_storage(storage: BaseStorage) -> str:
    """The storage for a log line, without a password."""
    if isinstance(storage, RDBStorage):
        import sqlalchemy

        return sqlalchemy.engine.make_url(storage.url).render_as_string(hide_password=True)
    return "a journal file"


def storage_of(study: optuna.Study) -> tuple[BaseStorage, int]:
    """The study's storage and id: optuna keeps them private, and the atomic slot moves need them
    (pinned: optuna 5.0.0)."""
    return study._storage, study._study_id


def open_study(storage: BaseStorage, name: str, directions: list[str], sampler, pruner, slots: list[dict[str, Any]],
               setup: dict[str, Any], strategy: dict[str, Any]) -> optuna.Study:
    """Create the study with its slots (each a dict of fixed params, {} to sample), or load it.

    `setup` (the base config and the space) and `strategy` (sampler and pruner) are stored with a
    new study; loading a study made with others is an error, so one study never mixes trials that
    cannot be compared, and a rerun never passes off old results as a new strategy's.
    Asking for more slots than the study has adds the difference.
    """
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler,
                                    pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        _check_same(study, name, directions, setup, strategy)
        _wait_ready(study, name, slots)
        return study
    study.set_user_attr(SETUP_ATTR, setup)
    study.set_user_attr(STRATEGY_ATTR, strategy)
    for params in slots:
        study.enqueue_trial(params)
    study.set_user_attr(TRIALS_ATTR, len(slots))  # last: other processes wait for it
    return study


def _check_same(study: optuna.Study, name: str, directions: list[str], setup: dict[str, Any],
                strategy: dict[str, Any]) -> None:
    had = [d.name.lower() for d in study.directions]
    if had != directions:
        raise TunesmithError(f"study {name} has objectives to {', '.join(had)}; this search would {', '.join(directions)} "
                             "(another metric or --also): use another --study")
    stored = study.user_attrs.get(SETUP_ATTR)  # None: its creator died before writing it
    old, new = _flat(stored or {}), _flat(setup)
    changed = [] if stored is None else sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        raise TunesmithError(f"study {name} was made with another config or space (differs in {', '.join(changed[:8])}"
                             f"{' ...' if len(changed) > 8 else ''}); rerun with the same settings, or use another --study")
    made = study.user_attrs.get(STRATEGY_ATTR)
    if made is not None and made != strategy:
        raise TunesmithError(f"study {name} was made with " + ", ".join(f"--{k} {v}" for k, v in made.items())
                             + "; rerun with those, or use another --study")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): json.dumps(tree, sort_keys=True)}


def _wait_ready(study: optuna.Study, name: str, slots: list[dict[str, Any]]) -> None:
    """Wait for the creating process to enqueue the slots; top up when more are asked for."""
    deadline = time.monotonic() + READY_WAIT_S
    while TRIALS_ATTR not in study.user_attrs:
        if time.monotonic() > deadline:  # its creator died half way: finish its work
            have = len(study.get_trials(deepcopy=False))
            for params in slots[have:]:
                study.enqueue_trial(params)
            study.set_user_attr(TRIALS_ATTR, len(slots))
            return
        time.sleep(1)
    have = study.user_attrs[TRIALS_ATTR]
    if len(slots) > have:
        for params in slots[have:]:
            study.enqueue_trial(params)
        study.set_user_attr(TRIALS_ATTR, len(slots))


# ---------------------------------------------------------------- taking a slot, owning a trial
def take_slot(study: optuna.Study) -> int | None:
    """Atomically move one waiting trial to RUNNING for this process; None when none is left.

    (Study.ask would create a new trial when none waits; a search never runs more than its slots.)
    """
    storage, study_id = storage_of(study)
    for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                if isinstance(storage, RDBStorage):
                    storage.record_heartbeat(t._trial_id)  # before anything else can fail
                storage.set_trial_user_attr(t._trial_id, "owner", owner())
                return t._trial_id
        except UpdateFinishedTrialError:
            continue
    return None


def owner() -> dict[str, Any]:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def _owner_alive(o: dict[str, Any]) -> bool | None:
    """Whether a trial's owner runs: None when it is on another machine (then the heartbeat decides)."""
    import psutil

    if o.get("host") != socket.gethostname():
        return None
    try:
        return abs(psutil.Process(o["pid"]).create_time() - o["started"]) < 0.5  # the pid may be reused
    except psutil.NoSuchProcess:
        return False


def recover_dead_trials(study: optuna.Study) -> list[int]:
    """Fail and re-enqueue the running trials whose search process is gone; returns their numbers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # databases: heartbeats older than GRACE_S (retried by the callback)
    (storage, study_id), done = storage_of(study), []
    for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        o = t.user_attrs.get("owner")
        if o is not None:
            dead = _owner_alive(o) is False
        else:  # killed between taking the slot and writing its owner (milliseconds)
            dead = t.datetime_start is not None and (datetime.now() - t.datetime_start).total_seconds() > GRACE_S
        if not dead:
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                retry_dead_trial(study, storage.get_trial(t._trial_id))
                done.append(t.number)
        except UpdateFinishedTrialError:
            continue  # another process got there first
    return done


def retry_dead_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue a dead trial again with its parameters (up to MAX_RETRIES times)."""
    history = list(trial.user_attrs.get("retry_of", [])) + [trial.number]
    if len(history) > MAX_RETRIES:
        return
    study.enqueue_trial(trial.params, user_attrs={"retry_of": history})


def interrupted(study: optuna.Study, trial_id: int, detail: str) -> None:
    """A trial this process stopped (Ctrl-C, the caller's cancel): failed now, retried by a rerun."""
    storage, _ = storage_of(study)
    storage.set_trial_user_attr(trial_id, "detail", detail)
    if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
        retry_dead_trial(study, storage.get_trial(trial_id))


class Heartbeat:
    """Touches this process's running trials every HEARTBEAT_S seconds (databases only)."""

    def __init__(self, storage: BaseStorage) -> None:
        self.storage = storage
        self.ids: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="tunesmith-heartbeat")
        if isinstance(storage, RDBStorage):
            self.thread.start()

    def add(self, trial_id: int) -> None:
        with self.lock:
            self.ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self.lock:
            self.ids.discard(trial_id)

    def _run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            with self.lock:
                ids = list(self.ids)
            for tid in ids:
                self.storage.record_heartbeat(tid)

    def close(self) -> None:
        self.stop.set()

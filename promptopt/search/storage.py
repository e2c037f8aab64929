"""Where a search's study lives: an Optuna storage opened from ``--storage``, checked before anything is written.

Three kinds of storage hold a study, all with the same behaviour for the search:

* a journal file (the default, ``<run_dir>/study.log``, or any path): safe for several processes on
  one machine (or on a shared file system);
* ``sqlite:///file.db``: one file, fine for a few processes on one machine;
* ``postgresql://user:password@host:5432/db`` (or ``mysql://...``): a server that workers on
  several machines share. ``postgresql://`` uses psycopg 3 (``pip install promptopt[distributed]``)
  when psycopg2 is not installed.

Every storage records a *heartbeat* of each running trial: Optuna's own for the relational
storages (``heartbeat_interval``, ``grace_period``), and the same protocol for the journal file
(:class:`HeartbeatJournalStorage`, heartbeats in a trial system attribute). A trial whose heartbeat
is older than the grace period belongs to a dead worker: Optuna's ``fail_stale_trials`` marks it
failed, and :class:`RetryDeadTrial` (Optuna's ``RetryFailedTrialCallback``) queues its parameters
again as a WAITING trial, which the next worker to ask for a trial runs.

Errors a user can make here — a malformed or unreachable URL, wrong credentials, a missing
driver — are one-line :class:`~promptopt.errors.ConfigError` naming the storage with its password
hidden, raised before the run folder is created.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import random
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

# Optuna exposes the heartbeat interface only from this module; ``fail_stale_trials`` checks for it.
from optuna.storages._heartbeat import BaseHeartbeat

from ..errors import ConfigError

#: trial system attribute holding the journal heartbeat (seconds since the epoch, this machine's clock)
HEARTBEAT_ATTR = "promptopt:heartbeat"
#: trial user attributes that describe one attempt at a trial (who ran it, how it ended), not its configuration
ATTEMPT_ATTRS = ("worker", "process", "error", "interrupted", "surplus", "pruned", "duplicate_of", "wall_s",
                 "forwards")
#: retries of one trial whose worker died (a trial that kills every worker that runs it stays failed after these)
MAX_RETRIES = 2

_PASSWORD = re.compile(r"(?<=://)([^:/@\s]*):([^@/\s]*)@")


def redact(text: str) -> str:
    """``text`` with the password of any ``scheme://user:password@host`` in it replaced by ``***``."""
    return _PASSWORD.sub(lambda m: f"{m.group(1)}:***@", text)


def is_url(storage: str) -> bool:
    return "://" in storage


@contextmanager
def quiet_optuna_warnings() -> Iterator[None]:
    """Heartbeats, retries and ask/tell with heartbeats are marked experimental (or "meant for optimize")
    in Optuna: those warnings say nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


_RetryBase: type = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) \
    or optuna.storages.RetryFailedTrialCallback


class RetryDeadTrial(_RetryBase):  # type: ignore[misc, valid-type]
    """Optuna's retry callback, minus the dead attempt's bookkeeping.

    The queued trial keeps the dead one's parameters (so a resumed search evaluates exactly what the
    dead worker was evaluating) but not who ran it, its heartbeat or how it ended: those describe the
    attempt, and a stale heartbeat copied into the new trial would make it look dead at once.
    """

    def __init__(self, max_retry: int | None = MAX_RETRIES) -> None:
        with quiet_optuna_warnings():
            super().__init__(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        clean = copy.copy(trial)
        clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in ATTEMPT_ATTRS}
        clean.system_attrs = {k: v for k, v in trial.system_attrs.items() if k != HEARTBEAT_ATTR}
        with quiet_optuna_warnings():
            super().__call__(study, clean)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal-file storage with Optuna's heartbeat protocol (Optuna implements it for RDB storages only).

    The file format is the journal's own: heartbeats are trial system attributes, so any Optuna tool
    (``optuna-dashboard study.log``) reads the study. Times are this machine's clock; workers on
    several machines sharing a journal over a network file system need clocks closer than the
    grace period.
    """

    def __init__(self, path: str | Path, heartbeat_interval: int, grace_period: int | None = None,
                 callback: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> None:
        super().__init__(JournalFileBackend(str(path)))
        self.heartbeat_interval = int(heartbeat_interval)
        self.grace_period = int(grace_period or 2 * self.heartbeat_interval)
        self.callback = callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # the trial ended (or was failed as stale by another worker) since the last beat

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
                if HEARTBEAT_ATTR in t.system_attrs and now - float(t.system_attrs[HEARTBEAT_ATTR]) > self.grace_period]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.callback

    get_failed_trial_callback = get_heartbeat_stale_trial_callback  # the name before Optuna 4.9


def storage_url(url: str) -> str:
    """The URL as SQLAlchemy needs it: plain ``postgresql://`` means psycopg 3 when psycopg2 is absent."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is None \
            and importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # several processes on one file wait for its lock
    if url.startswith("postgresql"):
        # fail in seconds on an unreachable host; survive a server that closes idle connections
        return {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    return {"pool_pre_ping": True}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    text = re.sub(r"^\([\w.]+\)\s*", "", text.splitlines()[0])  # SQLAlchemy's "(psycopg.OperationalError) "
    return redact(text)


def open_storage(storage: str | None, run_dir: Path, *, heartbeat_interval: int = 60,
                 grace_period: int | None = None) -> Any:
    """An Optuna storage with heartbeats and retries: the default journal file in ``run_dir``, a journal
    file path, or a database URL. Unreachable or malformed URLs are a ConfigError naming the storage."""
    if heartbeat_interval < 1:
        raise ConfigError(f"--heartbeat {heartbeat_interval}: give at least 1 second")
    if grace_period is not None and grace_period <= heartbeat_interval:
        raise ConfigError(f"grace period {grace_period} s: must be longer than the heartbeat interval "
                          f"({heartbeat_interval} s)")
    callback = RetryDeadTrial()
    if storage is None:
        storage = str(run_dir / "study.log")
    if not is_url(storage):
        path = Path(storage)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return HeartbeatJournalStorage(path, heartbeat_interval, grace_period, callback)
        except OSError as exc:
            raise ConfigError(f"--storage {storage}: cannot open the journal file ({exc.strerror or exc})") from None
    url = storage_url(storage)
    params = inspect.signature(optuna.storages.RDBStorage).parameters
    hook = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
    for attempt in range(5):
        try:
            with quiet_optuna_warnings():
                return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url),
                                                  heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                                  **{hook: callback})
        except ImportError:
            raise ConfigError(f"--storage {redact(storage)}: no database driver for this URL is installed "
                              "(for postgresql:// install promptopt[distributed], i.e. psycopg)") from None
        except Exception as exc:  # SQLAlchemy's: bad URL, unknown dialect, refused connection, bad password, ...
            if _creation_race(exc) and attempt < 4:
                time.sleep(0.2 + random.random())  # workers started together all create Optuna's tables: retry
                continue
            raise ConfigError(f"--storage {redact(storage)}: cannot open the study storage ({_first_line(exc)})") \
                from None
    raise AssertionError("unreachable")  # pragma: no cover


def _creation_race(exc: BaseException) -> bool:
    """Another worker created Optuna's tables (or the study) at the same moment as this one."""
    text = str(exc).lower()
    return "duplicate key" in text or "already exists" in text


def describe_storage(storage: str | None, run_dir: Path) -> str:
    """The storage as reports show it: the journal path, or the URL with its password hidden."""
    return redact(storage) if storage is not None else str(run_dir / "study.log")


__all__ = ["open_storage", "describe_storage", "redact", "storage_url", "HeartbeatJournalStorage", "RetryDeadTrial",
           "HEARTBEAT_ATTR", "ATTEMPT_ATTRS", "MAX_RETRIES",
           "quiet_optuna_warnings"]

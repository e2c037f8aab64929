"""Several workers, one study: exactly ``n_trials`` finished trials, dead workers' trials retried, no repeated work.

A worker is one process running :func:`run_worker` on a study that other processes, on this machine or
others, may be running too. The storage is all they share; the rules below need nothing else.

Counting
    A trial is *finished* when COMPLETE or PRUNED. Failed trials do not count toward ``n_trials``: one that
    raised (its message kept in the ``error`` attribute), one whose worker died, one given up as surplus.

Exactly ``n_trials``
    Creating a trial (``ask``) is atomic in every Optuna storage and numbers trials in creation order;
    "count, then create" is not atomic. So a worker creates first and checks after: its trial T runs only if

        finished trials + RUNNING or WAITING trials numbered below T  <  n_trials,

    and is otherwise *surplus*: failed at once (``surplus`` attribute) without evaluating anything. Were
    n_trials + 1 trials to finish, the highest-numbered of them would have counted the other n_trials at
    its check and not run. Before asking, a worker whose every remaining slot is held by a running trial
    waits (polling the storage) instead of creating a surplus trial, so surplus trials only come from
    true races. A worker leaves only once n_trials trials are finished: a trial that fails late, or the
    trial of a worker that died, is always taken over by a live worker. ``ask`` runs queued (WAITING)
    trials first; one left over when the study is complete stays queued for an extension.

Dead workers
    Before asking, and while waiting, a worker fails the trials of dead workers and queues their
    parameters again as a WAITING trial (:class:`~promptopt.search.storage.RetryDeadTrial`, Optuna's
    ``RetryFailedTrialCallback``): a trial whose heartbeat is older than the grace period (Optuna's
    ``fail_stale_trials``); a trial whose worker was a process of this machine that has ended (so a search
    rerun right after a kill does not wait for the grace period); a RUNNING trial that no worker claimed
    within the grace period (killed between its creation and its first heartbeat, or left by an older
    promptopt). Ctrl-C fails the running trial and queues it the same way before the interrupt goes on.

No repeated work
    Once a trial's parameters are suggested, an earlier finished trial with the same parameters gives
    its outcome (value, or pruning) instead of a new evaluation (``duplicate_of``); while such a twin that
    started running first is still running, the trial waits for it.

Seeds
    The sampler is rebuilt before each ``ask`` with a seed derived from the study's seed and the trial's
    *ordinal*: how many trials before it are not *void* (failed because their worker died or was
    interrupted — and so retried — or surplus). In a single-worker search, killing and resuming gives
    every trial the ordinal, the history and so the parameters it has in an uninterrupted search. While
    other trials run, the worker's identity joins the seed, so concurrent workers do not draw alike.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from ..errors import PromptOptError
from .storage import RetryDeadTrial, quiet_optuna_warnings

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_HELD = (TrialState.RUNNING, TrialState.WAITING)


class SearchError(PromptOptError):
    """A search that cannot go on: its trials keep failing."""


class TrialTakenOver(Exception):
    """Our running trial was failed by another worker (its heartbeat looked stale): our result is dropped."""


# --- who runs a trial --------------------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> str | None:
    """Start time of a live process (clock ticks since boot), None when it has ended (zombies included)."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return None if len(fields) < 20 or fields[0] in ("Z", "X") else fields[19]


def this_process() -> dict[str, Any]:
    """This process, identified across machines: boot id and pid namespace (Linux), pid and start time."""
    try:
        pidns: int | None = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = None
    pid = os.getpid()
    return {"boot": _read("/proc/sys/kernel/random/boot_id"), "pidns": pidns, "pid": pid, "start": _start_ticks(pid)}


def process_ended(proc: Any) -> bool:
    """True only when ``proc`` (from :func:`this_process`) ran on this machine since its last boot, in this
    pid namespace, and is no longer running; False when that cannot be known (another machine, no /proc)."""
    me = this_process()
    if not isinstance(proc, dict) or me["boot"] is None or me["pidns"] is None:
        return False
    if proc.get("boot") != me["boot"] or proc.get("pidns") != me["pidns"]:
        return False
    return _start_ticks(int(proc.get("pid", -1))) != proc.get("start")


def worker_name() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"


# --- heartbeats and dead trials ---------------------------------------------------------------------------
@contextmanager
def heartbeat(storage: Any, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every interval while the block runs (storages with heartbeats only)."""
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a storage hiccup: the next beat tries again, within the grace period
                pass
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"promptopt-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class DeadTrials:
    """Fails the running trials of dead workers and queues their parameters again (see the module docstring)."""

    def __init__(self, study: optuna.Study, grace_period: float, log: Callable[[str], None] | None = None) -> None:
        self.study, self.grace, self.log = study, float(grace_period), log
        self.retry = RetryDeadTrial()
        self._unclaimed_since: dict[int, float] = {}

    def reap(self) -> None:
        now = time.monotonic()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            proc = t.user_attrs.get("process")
            if proc is not None:
                if process_ended(proc):
                    self._fail(t, f"its worker {t.user_attrs.get('worker', '?')} ended during the trial")
            elif now - self._unclaimed_since.setdefault(t._trial_id, now) > self.grace:
                self._fail(t, f"no worker claimed it for {self.grace:.0f} s")
        with quiet_optuna_warnings():
            optuna.storages.fail_stale_trials(self.study)  # heartbeat older than the grace period

    def _fail(self, trial: FrozenTrial, why: str) -> None:
        storage = self.study._storage
        try:
            storage.set_trial_user_attr(trial._trial_id, "error", f"worker lost: {why}")
            if not storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                return
        except UpdateFinishedTrialError:
            return  # another worker failed it first (and queued its retry)
        if self.log:
            self.log(f"trial {trial.number} failed: {why}; its parameters are queued again")
        self.retry(self.study, storage.get_trial(trial._trial_id))


# --- bookkeeping over the study's trials -------------------------------------------------------------------
def void_trials(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that stand for no outcome: retried (dead worker, Ctrl-C) or surplus."""
    void = {int(n) for t in trials for n in t.system_attrs.get("retry_history", [])}
    return void | {t.number for t in trials if t.state == TrialState.FAIL and "surplus" in t.user_attrs}


def ordinals(trials: Sequence[FrozenTrial]) -> dict[int, int]:
    """Trial number → ordinal (the trial's position among non-void trials; equals its number in an
    uninterrupted single-worker search)."""
    void = void_trials(trials)
    out, k = {}, 0
    for t in sorted(trials, key=lambda t: t.number):
        if t.number not in void:
            out[t.number] = k
            k += 1
    return out


def is_surplus(trials: Sequence[FrozenTrial], number: int, n_trials: int) -> bool:
    """The slot rule: trial ``number`` may run only while fewer than ``n_trials`` trials are finished or
    held by a lower-numbered running or waiting trial."""
    held = sum(1 for t in trials if t.number != number
               and (t.state in FINISHED or (t.state in _HELD and t.number < number)))
    return held >= n_trials


def _started(trial: FrozenTrial) -> tuple[datetime, int]:
    """Order of running trials by when they started (number breaks ties): every worker reads the same values."""
    start = trial.datetime_start or datetime.max
    return (start.replace(tzinfo=None), trial.number)


def sampler_seed(seed: int | None, ordinal: int, worker: Any = None) -> int:
    """The seed of the sampler that draws the trial at ``ordinal`` (fresh randomness when ``seed`` is None)."""
    if seed is None:
        return secrets.randbits(31)
    digest = hashlib.sha256(repr((int(seed), int(ordinal), worker)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# --- the worker ------------------------------------------------------------------------------------------------
class Worker:
    """One process's share of a study: ``run()`` until ``n_trials`` trials are finished (see the module docstring).

    ``suggest(trial)`` draws the trial's parameters (``trial.suggest_*``); ``evaluate(trial)`` returns its
    value, may raise ``optuna.TrialPruned``, and stores its results as user attributes, of which
    ``reused_attrs`` are copied to trials that reuse its outcome. ``sampler_for(seed)`` builds the sampler.
    """

    def __init__(self, study: optuna.Study, n_trials: int, suggest: Callable[[optuna.Trial], None],
                 evaluate: Callable[[optuna.Trial], float], *,
                 sampler_for: Callable[[int], optuna.samplers.BaseSampler],
                 seed: int | None = 0, grace_period: float = 120.0, poll: float = 0.5, max_failures: int = 5,
                 reused_attrs: Sequence[str] = (), log: Callable[[str], None] | None = None,
                 on_trial: Callable[[FrozenTrial, int], None] | None = None) -> None:
        self.study, self.n_trials, self.suggest, self.evaluate = study, int(n_trials), suggest, evaluate
        self.sampler_for, self.seed, self.poll, self.max_failures = sampler_for, seed, float(poll), int(max_failures)
        self.reused_attrs, self.log, self.on_trial = tuple(reused_attrs), log, on_trial
        self.storage = study._storage  # Optuna offers no public handle; trial-level calls (heartbeat, FAIL) need it
        self.dead = DeadTrials(study, grace_period, log)
        self.ran: list[int] = []  # trials this worker evaluated or reused (told COMPLETE, PRUNED or FAIL)

    def _say(self, text: str) -> None:
        if self.log:
            self.log(text)

    def run(self) -> list[int]:
        failures: list[str] = []
        while True:
            self.dead.reap()
            trials = self.study.get_trials(deepcopy=False)
            finished = sum(t.state in FINISHED for t in trials)
            if finished >= self.n_trials:
                return self.ran
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if finished + running >= self.n_trials:
                time.sleep(self.poll)  # every open slot is being worked on: wait, in case one fails
                continue
            ordinal = len(trials) - len(void_trials(trials))
            self.study.sampler = self.sampler_for(sampler_seed(self.seed, ordinal, this_process() if running else None))
            with quiet_optuna_warnings():
                trial = self.study.ask()
            try:
                outcome = self._attempt(trial)
            except TrialTakenOver:
                self._say(f"trial {trial.number} was failed by another worker (no heartbeat seen for the grace "
                          "period); its result is dropped and its parameters run again")
                continue
            if outcome is None:  # surplus
                continue
            self.ran.append(trial.number)
            state, error = outcome
            if self.on_trial:
                self.on_trial(self.storage.get_trial(trial._trial_id), self._finished())
            if state == TrialState.FAIL:
                failures.append(f"trial {trial.number}: {error}")
                self._say(f"trial {trial.number} failed: {error}")
                if len(failures) >= self.max_failures:
                    raise SearchError(f"{len(failures)} trials in a row failed; the last, {failures[-1]}")
            else:
                failures.clear()

    def _finished(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=FINISHED))

    def _attempt(self, trial: optuna.Trial) -> tuple[TrialState, str | None] | None:
        """Run one asked trial to its end: (state, error message), or None when it was surplus."""
        try:
            with heartbeat(self.storage, trial._trial_id):
                trial.set_user_attr("worker", worker_name())
                trial.set_user_attr("process", this_process())
                surplus = is_surplus(self.study.get_trials(deepcopy=False), trial.number, self.n_trials)
                if surplus:
                    trial.set_user_attr("surplus", f"{self.n_trials} trials were already finished or running")
                    state, value, error = TrialState.FAIL, None, None
                else:
                    state, value, error = self._outcome(trial)
        except KeyboardInterrupt:
            self._give_back(trial)
            raise
        except UpdateFinishedTrialError:
            raise TrialTakenOver() from None
        self._tell(trial, state, value)
        return None if surplus else (state, error)

    def _outcome(self, trial: optuna.Trial) -> tuple[TrialState, float | None, str | None]:
        t0 = time.perf_counter()
        try:
            self.suggest(trial)
            twin = self._settled_twin(trial)
            if twin is not None:
                trial.set_user_attr("duplicate_of", twin.number)
                for key in self.reused_attrs:
                    if key in twin.user_attrs:
                        trial.set_user_attr(key, twin.user_attrs[key])
                if twin.state == TrialState.PRUNED:
                    trial.set_user_attr("pruned", f"same parameters as trial {twin.number}, which was pruned")
                    return TrialState.PRUNED, None, None
                return TrialState.COMPLETE, twin.value, None
            value = float(self.evaluate(trial))
            trial.set_user_attr("wall_s", round(time.perf_counter() - t0, 3))
            if math.isnan(value):
                trial.set_user_attr("error", "the objective is NaN")
                return TrialState.FAIL, None, "the objective is NaN"
            return TrialState.COMPLETE, value, None
        except optuna.TrialPruned as exc:
            trial.set_user_attr("pruned", str(exc) or "pruned")
            return TrialState.PRUNED, None, None
        except UpdateFinishedTrialError:
            raise
        except Exception as exc:  # a CUDA out-of-memory error, a corrupt image met mid-trial, ...
            text = str(exc).strip()
            error = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
            trial.set_user_attr("error", error)
            return TrialState.FAIL, None, error

    def _settled_twin(self, trial: optuna.Trial) -> FrozenTrial | None:
        """The earliest finished trial with this trial's parameters, waiting while one that started running
        before this one (a queued retry may carry a higher number) still runs."""
        mine = self.storage.get_trial(trial._trial_id)
        while True:
            twins = [t for t in self.study.get_trials(deepcopy=False)
                     if t.number != trial.number and t.params == mine.params]
            done = [t for t in twins if t.state in FINISHED]
            if done:
                return done[0]
            if not any(t.state == TrialState.RUNNING and _started(t) < _started(mine) for t in twins):
                return None
            self.dead.reap()
            time.sleep(self.poll)

    def _tell(self, trial: optuna.Trial, state: TrialState, value: float | None) -> None:
        try:
            with quiet_optuna_warnings():
                if state == TrialState.COMPLETE:
                    self.study.tell(trial, value)
                else:
                    self.study.tell(trial, state=state)
        except (UpdateFinishedTrialError, ValueError):
            if self.storage.get_trial(trial._trial_id).state == TrialState.FAIL:
                raise TrialTakenOver() from None
            raise

    def _give_back(self, trial: optuna.Trial) -> None:
        """Ctrl-C: fail the trial and queue its parameters again, so a rerun evaluates them first."""
        storage = self.storage
        try:
            storage.set_trial_user_attr(trial._trial_id, "interrupted", "Ctrl-C")
            if storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                self.dead.retry(self.study, storage.get_trial(trial._trial_id))
        except UpdateFinishedTrialError:
            pass


def run_worker(study: optuna.Study, n_trials: int, suggest: Callable[[optuna.Trial], None],
               evaluate: Callable[[optuna.Trial], float], **options: Any) -> list[int]:
    """Take part in ``study`` until it holds ``n_trials`` finished trials; the numbers of the trials run here."""
    return Worker(study, n_trials, suggest, evaluate, **options).run()


__all__ = ["run_worker", "Worker", "SearchError", "DeadTrials", "heartbeat", "is_surplus", "ordinals", "void_trials",
           "sampler_seed", "this_process", "process_ended", "FINISHED"]

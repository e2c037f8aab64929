"""Trials per minute of `promptopt search` with 1, 2 and 3 worker processes on one machine (features backend).

Each setting runs N trials of one fresh study with W copies of the same `promptopt search` command started
together (as a user would on one machine), on the default journal file (or ``--storage``, e.g. a PostgreSQL
URL; each setting then uses its own study name). Two rates are reported:

* ``wall``: N trials over the wall time of the whole commands (process start, imports, the trials, the report);
* ``trials``: finished trials per minute between the first trial's start and the last trial's end, read from the
  study (what the workers add once running).

Trials that reused an earlier trial's outcome (same configuration) cost nothing; the table counts them apart, and
``mean_trial_s`` is the mean wall time of the trials that were evaluated (it grows when workers compete for cores;
the settings sample different configurations, so their work differs somewhat). The load average after each setting
says whether other processes shared the machine.
On a machine with C cores, W workers can only go faster while W <= C and the workers are not memory-bound:
a 2-core machine can show at most a 2x gain, and nothing about several machines or GPUs.

    python benchmarks/bench_search_workers.py --n-trials 24 --workers 1,2,3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from promptopt.data import bundled_sample_root
from promptopt.search.storage import open_storage


def run_setting(workers: int, n_trials: int, data: Path, category: str, root: Path, storage: str | None) -> dict:
    out = root / f"w{workers}"
    study = f"bench-{category}-w{workers}-{os.getpid()}"

    def command(i: int) -> list[str]:
        # a journal file lives in the run folder, which the workers then share; with a database each has its own
        folder = out if storage is None or i == 0 else Path(f"{out}-{i}")
        cmd = [sys.executable, "-m", "promptopt.cli", "search", "--data", str(data), "--category", category,
               "--out", str(folder), "--n-trials", str(n_trials), "--max-k", "4", "--heartbeat", "10", "--quiet",
               "--study-name", study]
        return cmd + (["--storage", storage] if storage else [])

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen(command(i), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(workers)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"worker failed: {err[-2000:]}")
    wall = time.perf_counter() - t0
    trials = optuna.load_study(study_name=study, storage=open_storage(storage, out)).get_trials(deepcopy=False)
    done = [t for t in trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    evaluated = [t.user_attrs["wall_s"] for t in done if "wall_s" in t.user_attrs]
    return {"workers": workers, "n_trials": len(done), "reused": sum("duplicate_of" in t.user_attrs for t in done),
            "mean_trial_s": round(sum(evaluated) / len(evaluated), 2) if evaluated else None,
            "load_avg_1min_after": round(os.getloadavg()[0], 2),
            "other_trials": len(trials) - len(done), "wall_s": round(wall, 2), "trial_span_s": round(span, 2),
            "trials_per_min_wall": round(len(done) / wall * 60, 1),
            "trials_per_min_running": round(len(done) / span * 60, 1) if span > 0 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-trials", type=int, default=24)
    ap.add_argument("--workers", default="1,2,3")
    ap.add_argument("--data", default=None, help="dataset root (default: the bundled DAVIS sample)")
    ap.add_argument("--category", default=None, help="default: camel (of the bundled sample)")
    ap.add_argument("--storage", default=None, help="Optuna storage URL (default: a journal file per setting)")
    ap.add_argument("--out", default="benchmarks/results/search_workers.json")
    args = ap.parse_args()
    data = Path(args.data) if args.data else bundled_sample_root()
    category = args.category or "camel"
    root = Path(tempfile.mkdtemp(prefix="bench-search-"))
    rows = []
    try:
        for w in (int(x) for x in args.workers.split(",")):
            rows.append(run_setting(w, args.n_trials, data, category, root, args.storage))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"command": " ".join(["python", *sys.argv]), "cpus": os.cpu_count(),
              "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
              "data": str(data), "category": category, "storage": "journal file" if not args.storage else "url",
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'workers':>7} {'trials':>6} {'reused':>6} {'s/trial':>7} {'wall s':>7} {'/min wall':>9} "
          f"{'/min running':>12}")
    for r in rows:
        print(f"{r['workers']:>7} {r['n_trials']:>6} {r['reused']:>6} {r['mean_trial_s'] or '-':>7} {r['wall_s']:>7} "
              f"{r['trials_per_min_wall']:>9} {r['trials_per_min_running'] or '-':>12}")


if __name__ == "__main__":
    main()

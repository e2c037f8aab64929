"""The benchmark scripts keep running as the package changes (CI has no GPU and never runs them at full size).

`bench_seggpt_speed.py` broke once without any test noticing: its whole-step selector handed the oracle's
numbers where the selection had started ranking per-image results. Here it runs end to end on its tiny config:
each variant (eager, SDPA, SDPA with grouped prompt sets, chunked and whole-step) must make the same selection
with the same candidate scores as eager, and grouped sets must take fewer model calls than one set per call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_seggpt_speed_runs_and_every_variant_selects_like_eager(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_seggpt_speed.py"), "--config", "tiny", "--threads", "1",
           "--batches", "1,2", "--reps", "1", "--pool", "4", "--val", "2", "--k", "2", "--batch-size", "4",
           "--variants", "eager,sdpa,sdpa+grouped", "--out", str(out)]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["rows_per_second"]) == {"eager", "sdpa"}  # grouping does not change one row's cost
    rows = {k: v for k, v in result["forward_selection"].items() if isinstance(v, dict)}
    assert set(rows) == {"eager (chunked)", "sdpa (chunked)", "sdpa+grouped (chunked)", "sdpa+grouped (whole-step)"}
    for name, row in rows.items():
        assert row["selection_identical"], name
        assert row["max_abs_score_diff_vs_eager"] <= 1e-6, name
        assert row["rows"] == rows["eager (chunked)"]["rows"], name
    assert rows["sdpa+grouped (chunked)"]["model_calls"] < rows["sdpa (chunked)"]["model_calls"]

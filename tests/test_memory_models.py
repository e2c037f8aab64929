"""Memory models against the H100 measurements, the CUDA peak profiler's cache, and out-of-memory errors.

The measured file is ``tests/data/h100-2026-11-25.json`` (a copy of
``../shared/gpu/h100-2026-11-25.json``: peaks measured with
``torch.cuda.max_memory_allocated`` through promptopt's backends, full-size
random-init models). Every estimate here is computed on the CPU from a config
alone (parameters counted on an empty meta-device model, no weights).
"""

from __future__ import annotations

import gc
import json
import re
import weakref
from pathlib import Path

import pytest
import torch
from transformers import SamVisionConfig, SegGptConfig

from promptopt.errors import BudgetError, ConfigError
from promptopt.memory import CudaPeakProfiler, ProfileKey, out_of_memory_as_budget_error
from promptopt.backends.memory_models import (
    RELEASED_SAM_VISION as SAM_VIT, SamShape, SegGptShape, persam_memory, released_sam_config as sam_config,
    seggpt_inference_memory, seggpt_tuning_memory,
)

H100 = json.loads((Path(__file__).parent / "data" / "h100-2026-11-25.json").read_text())
QUERY_HW = tuple(int(v) for v in re.search(r"image_size_hw = \[(\d+), (\d+)\]", H100["data"]).groups())
H100_BYTES = 80 * 2**30  # what an "OOM" row did not fit in
SEGGPT = SegGptConfig()


def assert_bound(estimate: int, peak: int, what: str) -> None:
    """Never below the measured peak, at most 10 % above it."""
    assert peak <= estimate <= 1.10 * peak, f"{what}: estimate {estimate / 1e9:.3f} GB vs measured {peak / 1e9:.3f} GB"


def _row_id(row: dict) -> str:
    return "-".join(f"{v}" for k, v in row.items() if k in ("dtype", "ensemble", "k", "checkpointing", "contexts",
                                                              "batch_size", "model"))


# --- shapes ------------------------------------------------------------------------------------------------

def test_default_seggpt_config_is_the_released_vit_large():
    """SegGptConfig() is BAAI/seggpt-vit-large: hidden 1024, 24 layers, 16 heads, 896x448 stacked input."""
    s = SegGptShape.of(SEGGPT)
    assert (s.hidden, s.layers, s.heads, s.mlp, s.patch) == (1024, 24, 16, 4096, 16)
    assert (2 * s.image_h, s.image_w) == (896, 448) and s.grid == (56, 28) and s.tokens == 1568
    assert s.merge_index == 2 and s.intermediates == 4 and s.decoder_hidden == 64


def test_sam_parameter_counts_match_the_models_measured_on_the_gpu():
    """Parameters counted on the meta device equal those of the real models in the H100 file."""
    assert SamVisionConfig().hidden_size == 768 and list(SamVisionConfig().global_attn_indexes) == [2, 5, 8, 11]
    measured = {r["model"]: r["params"] for r in H100["persam_bench"]["rows"] if r["model"] in SAM_VIT}
    assert measured  # vit-b and vit-h
    for kind, params in measured.items():
        assert SamShape.of(sam_config(kind)).params == params, kind


# --- SegGPT inference ----------------------------------------------------------------------------------------

FEATURE_ROWS = [(dt, r) for dt, rows in H100["seggpt_inference_feature_ensemble"].items() if dt != "note" for r in rows]


@pytest.mark.parametrize("dtype,row", FEATURE_ROWS, ids=[f"{dt}-k{r['k']}" for dt, r in FEATURE_ROWS])
def test_seggpt_feature_ensemble_rows(dtype, row):
    """predict(k prompts, one 854x480 query) in the feature ensemble, k = 1..15, float32 and bfloat16."""
    est = seggpt_inference_memory(SEGGPT, dtype=dtype, k=row["k"], image_size_hw=QUERY_HW, ensemble="feature")
    assert_bound(est.total, row["peak"], f"{dtype} k={row['k']}")


GRID = H100["seggpt_inference_bench_grid"]


@pytest.mark.parametrize("row", GRID, ids=[_row_id(r) for r in GRID])
def test_seggpt_bench_grid_rows(row):
    """Feature and output ensemble, k = 1, 2, 4, 8, 16 (output: 4 rows per call, k maps averaged)."""
    est = seggpt_inference_memory(SEGGPT, dtype=row["dtype"], k=row["k"], image_size_hw=QUERY_HW,
                                  ensemble=row["ensemble"], batch_size=4)
    assert_bound(est.total, row["peak_bytes"], _row_id(row))


def test_output_ensemble_grows_with_k_beyond_the_batch():
    """Output ensemble: rows stop at batch_size but the averaged maps and cached prompts keep growing."""
    def total(k: int) -> int:
        return seggpt_inference_memory(SEGGPT, dtype="float32", k=k, image_size_hw=QUERY_HW, ensemble="output").total

    one_row = total(2) - total(1)
    assert total(8) > total(4) and total(16) > total(8)
    assert total(16) - total(4) < one_row  # twelve more prompts cost less than one more row of the network


def test_sdpa_is_never_below_eager():
    """No SDPA measurements exist: its figure is the eager one, an upper bound."""
    for dtype in ("float32", "bfloat16"):
        eager = seggpt_inference_memory(SEGGPT, dtype=dtype, k=3, image_size_hw=QUERY_HW)
        sdpa = seggpt_inference_memory(SEGGPT, dtype=dtype, k=3, image_size_hw=QUERY_HW, attention="sdpa")
        assert sdpa.total >= eager.total and "upper bound" in sdpa.note
        tune = dict(dtype=dtype, contexts=2, batch_size=2, checkpointing=False, image_size_hw=QUERY_HW)
        assert seggpt_tuning_memory(SEGGPT, attention="sdpa", **tune).total >= seggpt_tuning_memory(SEGGPT, **tune).total


# --- SegGPT context tuning -----------------------------------------------------------------------------------

TUNING = H100["seggpt_context_tuning_one_step"]["rows"]


@pytest.mark.parametrize("row", TUNING, ids=[_row_id(r) for r in TUNING])
def test_seggpt_tuning_rows(row):
    """tuning_loss(contexts, batch) + backward, with and without checkpointing; OOM rows exceed the 80 GB card."""
    est = seggpt_tuning_memory(SEGGPT, dtype=row["dtype"], contexts=row["contexts"], batch_size=row["batch_size"],
                               checkpointing=row["checkpointing"], image_size_hw=QUERY_HW)
    if row["peak"] == "OOM":
        assert est.total > H100_BYTES
    else:
        assert_bound(est.total, row["peak"], _row_id(row))


def test_tuning_in_bfloat16_needs_more_than_float32_without_checkpointing():
    """The eager softmax runs in float32 and bfloat16 keeps both copies for backward."""
    kw = dict(contexts=2, batch_size=2, checkpointing=False, image_size_hw=QUERY_HW)
    assert seggpt_tuning_memory(SEGGPT, dtype="bfloat16", **kw).total > seggpt_tuning_memory(SEGGPT, dtype="float32", **kw).total


# --- PerSAM --------------------------------------------------------------------------------------------------

BENCH = [r for r in H100["persam_bench"]["rows"] if r["device"] == "cuda"]


@pytest.mark.parametrize("row", BENCH, ids=[_row_id(r) for r in BENCH])
def test_persam_bench_rows(row):
    """bench_persam: encoding 8 images (7 embeddings cached meanwhile), then PerSAM pairs with 8 cached."""
    cfg = sam_config(row["model"])
    enc = persam_memory(cfg, dtype=row["dtype"], k=7, image_size_hw=QUERY_HW, cached=False)
    pair = persam_memory(cfg, dtype=row["dtype"], k=7, image_size_hw=QUERY_HW, cached=True)
    assert_bound(enc.total, row["peak_encoder_bytes"], f"{row['model']} {row['dtype']} encoder")
    assert_bound(pair.total, row["peak_pair_bytes"], f"{row['model']} {row['dtype']} pair")


def harness_resident() -> dict[tuple[str, str], float]:
    """Memory the persam_predict measurement held besides PerSAM, per (model, dtype), from the file itself.

    The same backend, model and dtype were measured twice: in ``persam_bench``
    (clean) and in ``persam_predict``. The difference, corrected for the
    embeddings each had cached (8 vs k + 1), is the same whether taken from the
    encoder peaks (cold) or the decoder peaks (cached).
    """
    out = {}
    for b in BENCH:
        e = SamShape.of(sam_config(b["model"])).embedding_elems * (4 if b["dtype"] == "float32" else 2)
        p = next(r for r in H100["persam_predict"] if (r["model"], r["dtype"], r["k"]) == (b["model"], b["dtype"], 1))
        cold = p["peak_cold"] - (b["peak_encoder_bytes"] - 6 * e)  # encoding the query with 1 reference cached vs 7
        cached = p["peak_cached"] - (b["peak_pair_bytes"] - 6 * e)  # 2 embeddings cached vs 8
        out[(b["model"], b["dtype"])] = (cold, cached)
    return out


def test_persam_predict_rows_hold_the_same_foreign_memory_cold_and_cached():
    """The persam_predict peaks sit 0.8-0.9 GB above bench_persam's, identically cold and cached.

    So that memory is not PerSAM's (an encoder or decoder term would differ
    between the two); it is what the measuring process held.
    """
    for key, (cold, cached) in harness_resident().items():
        assert 0.75e9 < cold < 0.9e9 and abs(cold - cached) < 3e6, (key, cold, cached)


PREDICT = H100["persam_predict"]


@pytest.mark.parametrize("row", PREDICT, ids=[_row_id(r) for r in PREDICT])
def test_persam_predict_rows(row):
    """predict(k references, [query]), cold (encoder runs) and cached, with the harness's foreign memory resident.

    vit-l was not in bench_persam; it gets the smallest foreign memory seen.
    """
    found = harness_resident()
    cold, _ = found.get((row["model"], row["dtype"]), min(found.values()))
    cfg = sam_config(row["model"])
    for cached, peak in ((False, row["peak_cold"]), (True, row["peak_cached"])):
        est = persam_memory(cfg, dtype=row["dtype"], k=row["k"], image_size_hw=QUERY_HW, cached=cached,
                            resident_bytes=int(cold))
        assert_bound(est.total, peak, f"{_row_id(row)} {'cached' if cached else 'cold'}")


def test_persam_encoder_dominates_and_grows_with_model_size():
    """Cold needs the encoder's global attention (score tensors); bigger encoders need more."""
    cold = [persam_memory(sam_config(k), dtype="float32", k=1, image_size_hw=QUERY_HW, cached=False) for k in SAM_VIT]
    cached = [persam_memory(sam_config(k), dtype="float32", k=1, image_size_hw=QUERY_HW, cached=True) for k in SAM_VIT]
    assert all("encoder" in c.terms and c.total > w.total + 1.5e9 for c, w in zip(cold, cached))
    assert cold[0].total < cold[1].total < cold[2].total


# --- the estimate object and bad input --------------------------------------------------------------------

def test_a_model_instance_counts_its_own_parameters():
    """A model (not a config) is measured directly: a tiny random-init SegGPT."""
    from transformers import SegGptForImageSegmentation

    from promptopt.backends.seggpt import tiny_config

    model = SegGptForImageSegmentation(tiny_config())
    est = seggpt_inference_memory(model, dtype="float32", k=1)
    params = sum(p.numel() for p in model.parameters())
    assert est.terms["weights"] == 4 * params
    assert SegGptShape.of(tiny_config()).params == params  # a config alone: counted on an empty meta-device model
    assert int(est) == est.total > est.subtotal and "weights" in est.describe()


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype="float64", k=1), "dtype"),
    (dict(dtype="float32", k=0), "k must be"),
    (dict(dtype="float32", k="three"), "k must be"),
    (dict(dtype="float32", k=2.5), "k must be"),
    (dict(dtype="float32", k=1, ensemble="mean"), "ensemble"),
    (dict(dtype="float32", k=1, attention="flash"), "attention"),
    (dict(dtype="float32", k=1, image_size_hw=(0, 10)), "image_size_hw"),
    (dict(dtype="float32", k=1, image_size_hw="480x854"), "image_size_hw"),
    (dict(dtype="float32", k=1, resident_bytes=-1), "resident_bytes"),
])
def test_bad_input_is_a_one_line_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        seggpt_inference_memory(SEGGPT, **kwargs)


def test_wrong_config_kind_is_refused():
    with pytest.raises(ConfigError, match="seggpt"):
        seggpt_inference_memory(sam_config("vit-b"), dtype="float32", k=1)
    with pytest.raises(ConfigError, match="sam"):
        persam_memory(SEGGPT, dtype="float32", k=1, image_size_hw=QUERY_HW, cached=True)


# --- the CUDA peak profiler (its cache, on a fake measure) ------------------------------------------------

class FakeDevice:
    """Stands in for the CUDA allocator: a fixed increment per call and a resident count."""

    def __init__(self, increment: int, resident: int) -> None:
        self.increment, self.resident, self.calls = increment, resident, 0

    def measure(self, fn, device) -> int:
        self.calls += 1
        fn()
        return self.increment


def test_profiler_measures_each_key_once_and_adds_resident_and_margin():
    dev = FakeDevice(increment=1000, resident=50)
    prof = CudaPeakProfiler(margin=0.02, measure=dev.measure, resident=lambda d: dev.resident)
    ran = []
    key = ProfileKey.of("cuda:0", torch.bfloat16, (448, 448), "feature", 3)
    assert prof.peak_bytes(key, lambda: ran.append(1)) == 50 + 1020
    dev.resident = 80  # a cache grew: the answer follows, the profile is not repeated
    assert prof.peak_bytes(key, lambda: ran.append(1)) == 80 + 1020
    assert dev.calls == 1 and ran == [1] and prof.measurements == 1 and key in prof


def test_profile_keys_normalise_device_dtype_and_shape():
    a = ProfileKey.of("cuda", torch.float32, [480, 854], "output", 4)
    b = ProfileKey.of(torch.device("cuda", 0), "float32", (480, 854), ("output",), (4,))
    assert a == b and hash(a) == hash(b)
    assert ProfileKey.of("cuda:0", "float32", (480, 854), "output", 4) != ProfileKey.of("cuda:1", "float32", (480, 854), "output", 4)
    assert ProfileKey.of("cuda:0", "float32", (480, 854), "tune", (2, 4)) != ProfileKey.of("cuda:0", "float32", (480, 854), "tune", (4, 2))


def test_profiler_keeps_different_keys_apart():
    dev = FakeDevice(increment=10, resident=0)
    prof = CudaPeakProfiler(margin=0.0, measure=dev.measure, resident=lambda d: 0)
    for dtype in ("float32", "bfloat16"):
        for rows in (1, 2):
            prof.peak_bytes(ProfileKey.of("cuda:0", dtype, (448, 448), "feature", rows), lambda: None)
    prof.peak_bytes(ProfileKey.of("cuda:0", "float32", (448, 448), "feature", 1), lambda: None)
    assert dev.calls == 4
    prof.clear()
    prof.peak_bytes(ProfileKey.of("cuda:0", "float32", (448, 448), "feature", 1), lambda: None)
    assert dev.calls == 5


def test_profiler_rejects_bad_keys_and_negative_increments():
    with pytest.raises(ValueError, match="positive"):
        ProfileKey.of("cuda:0", "float32", (448, 448), "feature", 0)
    with pytest.raises(ValueError, match="integers"):
        ProfileKey.of("cuda:0", "float32", ("a", 448), "feature", 1)
    prof = CudaPeakProfiler(measure=lambda fn, d: -5, resident=lambda d: 0)
    with pytest.raises(ValueError, match="negative"):
        prof.peak_bytes(ProfileKey.of("cuda:0", "float32", (448, 448), "feature", 1), lambda: None)


# --- out-of-memory errors ------------------------------------------------------------------------------------

def test_cuda_oom_becomes_a_one_line_budget_error_naming_step_estimate_and_budget():
    with pytest.raises(BudgetError) as info:
        with out_of_memory_as_budget_error("forward selection step 3 (k=4)", 6 * 2**30, 8 * 2**30):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines")
    msg = str(info.value)
    assert "\n" not in msg
    assert "forward selection step 3 (k=4)" in msg and "6.0 GiB" in msg and "8.0 GiB" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_other_errors_pass_through_the_oom_guard():
    with pytest.raises(KeyError):
        with out_of_memory_as_budget_error("step", 1, 2):
            raise KeyError("x")
    with out_of_memory_as_budget_error("step", 1, None) as guard:
        pass
    assert "no memory budget set" in guard.message()


def test_oom_guard_frees_what_the_failed_step_held():
    """After the BudgetError the failed step's tensors are gone, so the run can save its state and stop."""
    ref = None

    def step():
        nonlocal ref
        big = torch.zeros(1000)
        ref = weakref.ref(big)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(BudgetError) as info:
        with out_of_memory_as_budget_error("tuning step 7", 10, 5):
            step()
    gc.collect()
    assert ref is not None and ref() is None and "tuning step 7" in str(info.value)


# --- benchmarks/gpu_memory.py without a GPU ---------------------------------------------------------------

def _gpu_memory_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_memory.py"
    spec = importlib.util.spec_from_file_location("gpu_memory_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_plans_the_rows_of_the_h100_file():
    """gpu_memory.py regenerates the same rows (each with an analytic estimate) as the H100 file holds."""
    bench = _gpu_memory_module()
    p = bench.plan(QUERY_HW)
    for dt in ("float32", "bfloat16"):
        assert [r["k"] for r in p["seggpt_inference_feature_ensemble"][dt]] == \
            [r["k"] for r in H100["seggpt_inference_feature_ensemble"][dt]]
    key = lambda r, *f: tuple(r[x] for x in f)  # noqa: E731
    grid = ("dtype", "ensemble", "k")
    assert sorted(key(r, *grid) for r in p["seggpt_inference_bench_grid"]) == sorted(key(r, *grid) for r in GRID)
    tune = ("dtype", "checkpointing", "contexts", "batch_size")
    assert sorted(key(r, *tune) for r in p["seggpt_context_tuning_one_step"]["rows"]) == \
        sorted(key(r, *tune) for r in TUNING)
    assert sorted(key(r, "model", "dtype", "k") for r in p["persam_predict"]) == \
        sorted(key(r, "model", "dtype", "k") for r in PREDICT)
    tuned = {key(r, *tune): r["analytic"] for r in p["seggpt_context_tuning_one_step"]["rows"]}
    for r in TUNING:
        if r["peak"] != "OOM":
            assert_bound(tuned[key(r, *tune)], r["peak"], "planned " + _row_id(r))


def test_benchmark_harness_runs_end_to_end_on_cpu_with_tiny_models(monkeypatch, sample_root):
    """The measuring code drives the real backends (tiny random-init models, a stand-in for the CUDA counter)."""
    from transformers import SamConfig

    from promptopt.backends.seggpt import tiny_config
    from promptopt.data import Sample, scan_category

    bench = _gpu_memory_module()
    monkeypatch.setattr(bench, "DTYPES", ("float32",))  # bfloat16 matmuls are slow on CPUs; the code path is the same
    monkeypatch.setattr(bench, "FEATURE_KS", (1, 2))
    monkeypatch.setattr(bench, "GRID_KS", (1, 3))
    monkeypatch.setattr(bench, "TUNING_SHAPES", ((1, 1), (2, 2)))
    monkeypatch.setattr(bench, "PERSAM_KS", (1,))
    # real camel frames, downscaled 4x to keep the CPU run short
    frames = [Sample(s.id, "camel", image=s.image[::4, ::4].copy(), mask=s.mask[::4, ::4].copy())
              for s in sorted(scan_category(sample_root / "camel", "camel"), key=lambda s: s.id)[:5]]
    tiny_sam = SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8,
                           window_size=4, global_attn_indexes=[1], output_channels=32, num_pos_feats=16, mlp_dim=64),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32))
    calls = []

    def fake_peak(fn, device):
        fn()
        calls.append(device)
        return 10 ** 9

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        out = bench.run("cpu", fake_peak, seggpt_config=tiny_config(), sam_configs={"tiny": tiny_sam},
                        frames=(frames[:-1], frames[-1]))
    finally:
        torch.set_num_threads(threads)
    assert [r["peak"] for r in out["seggpt_inference_feature_ensemble"]["float32"]] == [10 ** 9, 10 ** 9]
    assert "bfloat16" not in out["seggpt_inference_feature_ensemble"]
    assert all(r["peak_bytes"] == 10 ** 9 and r["analytic_error"] is not None for r in out["seggpt_inference_bench_grid"])
    assert all(r["peak"] == 10 ** 9 for r in out["seggpt_context_tuning_one_step"]["rows"])
    assert all(r["peak_cold"] == r["peak_cached"] == 10 ** 9 for r in out["persam_predict"])
    assert len(calls) == 2 + 2 * 2 + 2 * 2 + 2  # feature k's, grid rows, tuning rows, persam cold + cached
    assert "| SegGPT context tuning, one step | 4 |" in bench.table(out)
    json.dumps(out)  # the file is plain JSON

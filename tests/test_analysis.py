"""Tests of segcore.results.analysis: every derived column and flag on hand-made tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from segcore.results import analysis as A
from segcore.results import caveats as C


def row(run_id: str, **kw) -> dict:
    """An ok row with the configuration columns a real run writes (1 worker, batch 4)."""
    r = {"sweep_id": "t", "run_id": run_id, "status": "ok", "engine": "ddp",
         "zero_stage": 0, "loader": "torch", "precision": "fp32", "channels_last": True,
         "compile": False, "world_size": 1, "nnodes": 1, "device_type": "cpu",
         "device_name": "Test CPU", "batch_size": 4, "arch": "modern", "depth": 3,
         "widths": "16-32-64", "image_size": 64, "class_scheme": "six", "num_classes": 6,
         "mode": "throughput", "strong_scaling": False, "measured_steps": 40,
         "throughput_img_s": 10.0}
    r.update(kw)
    r.setdefault("global_batch_size", r["batch_size"] * r["world_size"])
    return r


def analysed(*rows: dict) -> pd.DataFrame:
    return A.frame(pd.DataFrame(list(rows))).set_index("run_id", drop=False)


# --------------------------------------------------------------------------- frame


def test_frame_cleans_types():
    d = A.frame(pd.DataFrame([
        row("a", world_size="2", throughput_img_s="12.5", channels_last="true",
            widths=[16, 32, 64, 128], depth=None, status=" ok "),
        row("b", throughput_img_s="n/a", status="failed", channels_last=False),
    ]))
    assert d["world_size"].tolist() == [2.0, 1.0]
    assert d["throughput_img_s"].iloc[0] == 12.5
    assert math.isnan(d["throughput_img_s"].iloc[1])
    assert d["channels_last"].tolist() == [True, False]
    assert d["widths"].iloc[0] == "16-32-64-128"
    assert d["depth"].iloc[0] == 4.0  # filled from widths
    assert d["ok"].tolist() == [True, False]
    # Optional columns a reader may ask for exist even when the table lacks them.
    for c in ("throughput_ci95_pct", "hw_parallel_limit", "mem_workload_mb",
              *A.DERIVED_COLUMNS):
        assert c in d


def test_frame_empty_and_idempotent():
    for empty in (None, pd.DataFrame()):
        d = A.frame(empty)
        assert len(d) == 0 and set(A.DERIVED_COLUMNS) <= set(d.columns)
    d = analysed(row("w1"),
                 row("w2", world_size=2, throughput_img_s=19.0, measured_steps=5))
    again = A.frame(d)
    pd.testing.assert_series_equal(again["speedup"], d["speedup"].reset_index(drop=True))
    assert again["flags"].tolist() == d["flags"].tolist()


# --------------------------------------------------------------------------- speedup


def test_speedup_and_efficiency_exact():
    d = analysed(*(row(f"w{w}", world_size=w, throughput_img_s=t)
                   for w, t in ((1, 10.0), (2, 19.0), (4, 36.0))),
                 row("other-w2", world_size=2, batch_size=8, throughput_img_s=50.0),
                 row("failed-w2", world_size=2, status="failed", throughput_img_s=None))
    assert d.loc[["w1", "w2", "w4"], "speedup"].tolist() == pytest.approx([1.0, 1.9, 3.6])
    assert d.loc[["w1", "w2", "w4"], "scaling_efficiency"].tolist() == pytest.approx(
        [1.0, 0.95, 0.9])
    # Batch 8 has no 1-worker row; a failed row has no throughput.
    assert math.isnan(d.loc["other-w2", "speedup"])
    assert math.isnan(d.loc["failed-w2", "speedup"])


def test_speedup_baseline_is_median_of_repeats():
    d = analysed(*(row(f"w1-r{r}", repeat=r, throughput_img_s=t)
                   for r, t in enumerate((9.5, 10.0, 10.5))),
                 row("w2", world_size=2, throughput_img_s=19.0))
    assert d["speedup"].tolist() == pytest.approx([0.95, 1.0, 1.05, 1.9])


def test_families_strong_scaling_nodes_lr_rule():
    d = analysed(
        # Strong scaling: against its own 1-worker row (same global batch), not the weak
        # row of the same per-worker batch.
        row("s1", strong_scaling=True, batch_size=16, global_batch_size=16,
            throughput_img_s=10.0),
        row("s4", strong_scaling=True, world_size=4, batch_size=4, global_batch_size=16,
            throughput_img_s=30.0),
        row("weak-b4", throughput_img_s=100.0),
        # Two nodes of 4 workers compare with the same configuration on one worker.
        row("n8", world_size=8, nnodes=2, throughput_img_s=600.0),
        # An lr scaling rule changes lr with the worker count: the base lr names the family.
        row("lin1", batch_size=2, lr=0.003, base_lr=0.003, lr_scaling="linear",
            throughput_img_s=4.0),
        row("lin2", batch_size=2, world_size=2, lr=0.006, base_lr=0.003,
            lr_scaling="linear", throughput_img_s=8.0),
        # Without a base lr, a different lr is a different configuration.
        row("lr-b2", batch_size=2, world_size=2, lr=0.001, throughput_img_s=8.0),
    )
    assert d.loc["s4", "speedup"] == pytest.approx(3.0)
    assert d.loc["s4", "scaling_efficiency"] == pytest.approx(0.75)
    assert d.loc["n8", "speedup"] == pytest.approx(6.0)
    assert d.loc["lin2", "speedup"] == pytest.approx(2.0)
    assert math.isnan(d.loc["lr-b2", "speedup"])


def test_hardware_ceiling():
    d = analysed(*(row(f"w{w}", world_size=w, hw_parallel_limit=2,
                       throughput_img_s=10.0 * w) for w in (1, 2, 4)),
                 row("unknown", world_size=2, batch_size=8))
    assert d.loc[["w1", "w2", "w4"], "hw_ceiling_speedup"].tolist() == [1.0, 2.0, 2.0]
    assert math.isnan(d.loc["unknown", "hw_ceiling_speedup"])


def test_time_to_target_speedup():
    d = analysed(row("w1", mode="both", mIoU=0.7, time_to_target_s=100.0),
                 row("w2", world_size=2, mode="both", mIoU=0.7, time_to_target_s=40.0),
                 row("w4", world_size=4, mode="both", mIoU=0.5, time_to_target_s=None))
    assert d.loc["w2", "time_to_target_speedup"] == pytest.approx(2.5)
    assert d.loc["w1", "time_to_target_speedup"] == pytest.approx(1.0)
    assert math.isnan(d.loc["w4", "time_to_target_speedup"])  # never reached the target


# --------------------------------------------------------------------------- spread


def test_ci_columns_complete_each_other():
    d = analysed(row("pct", throughput_ci95_pct=5.0),
                 row("lohi", batch_size=8, throughput_img_s=20.0, throughput_ci95_lo=18.0,
                     throughput_ci95_hi=22.0))
    assert (d.loc["pct", "throughput_ci95_lo"], d.loc["pct", "throughput_ci95_hi"]) == \
        pytest.approx((9.5, 10.5))
    assert d.loc["lohi", "throughput_ci95_pct"] == pytest.approx(10.0)


def test_speedup_ci_adds_relative_widths_in_quadrature():
    d = analysed(row("w1", throughput_ci95_pct=3.0),
                 row("w2", world_size=2, throughput_img_s=18.0, throughput_ci95_pct=4.0),
                 row("nb1", batch_size=8),
                 row("nb2", batch_size=8, world_size=2, throughput_img_s=18.0))
    assert d.loc["w2", "speedup_ci95_lo"] == pytest.approx(1.8 * (1 - 0.05))
    assert d.loc["w2", "speedup_ci95_hi"] == pytest.approx(1.8 * (1 + 0.05))
    assert d.loc["w2", "scaling_efficiency_ci95_hi"] == pytest.approx(0.9 * 1.05)
    assert math.isnan(d.loc["nb2", "speedup_ci95_lo"])  # no CI, no bar


def test_spread_over_repeats():
    d = analysed(*(row(f"r{i}", repeat=i, throughput_img_s=t)
                   for i, t in enumerate((9.0, 10.0, 11.5))),
                 row("single", batch_size=8),
                 row("failed", status="failed", repeat=3, throughput_img_s=1.0))
    assert d.loc["r0", "throughput_spread_pct"] == pytest.approx(25.0)
    assert math.isnan(d.loc["single", "throughput_spread_pct"])
    assert math.isnan(d.loc["failed", "throughput_spread_pct"])


# --------------------------------------------------------------------------- flags


def flags(**kw) -> str:
    return analysed(row("x", **kw)).loc["x", "flags"]


def test_few_steps_boundary():
    assert flags(measured_steps=A.MIN_MEASURED_STEPS - 1) == "few-steps"
    assert flags(measured_steps=A.MIN_MEASURED_STEPS) == ""
    assert flags(measured_steps=None) == ""  # unknown is not "few"


def test_wide_ci_from_ci_and_from_repeats():
    assert flags(throughput_ci95_pct=A.CI_LIMIT_PCT + 0.5) == "wide-ci"
    assert flags(throughput_ci95_pct=A.CI_LIMIT_PCT - 0.5) == ""
    assert flags(throughput_ci95_lo=8.0, throughput_ci95_hi=12.0) == "wide-ci"  # +/-20 %
    d = analysed(row("a", repeat=0, throughput_img_s=10.0),
                 row("b", repeat=1, throughput_img_s=11.5),
                 row("c", batch_size=8, repeat=0, throughput_img_s=10.0),
                 row("d", batch_size=8, repeat=1, throughput_img_s=10.5))
    assert d["flags"].tolist() == ["wide-ci", "wide-ci", "", ""]


def test_condition_flags():
    assert flags(oversubscribed=True) == "oversubscribed"
    assert flags(oversubscribed="true") == "oversubscribed"
    assert flags(oversubscribed=False) == ""
    assert flags(precision="bf16", precision_emulated=True) == "emulated-precision"
    assert flags(device_type="cpu") == ""  # a CPU host is a caveat, not a flag


@pytest.mark.parametrize("kw,expect", [
    ({"mIoU": 0.6, "train_loss_first": 2.0, "train_loss_last": 0.8}, ""),
    ({"mIoU": None, "val_loss": 1.0}, "not-converged"),  # trained, no mIoU
    ({"mIoU": 0.6, "train_loss_first": 1.0, "train_loss_last": 1.2}, "not-converged"),
    ({"mIoU": 1 / 6}, "not-converged"),  # what a constant prediction can reach (6 classes)
    ({"mIoU": 1 / 6 + 0.01}, ""),
    ({"mIoU": 0.4, "num_classes": 2}, "not-converged"),  # binary: 1/2
])
def test_not_converged(kw, expect):
    assert flags(mode="both", **kw) == expect


def test_not_converged_only_for_runs_that_trained_for_accuracy():
    assert flags(mode="throughput", mIoU=None) == ""
    assert flags(mode=None, mIoU=None) == ""  # no mode, no accuracy recorded
    assert flags(mode=None, mIoU=0.05) == "not-converged"  # no mode, accuracy recorded
    assert flags(mode="accuracy", mIoU=None) == "not-converged"


def test_flags_list_every_reason_in_order_and_only_ok_rows():
    d = analysed(row("x", mode="both", mIoU=0.01, measured_steps=3, oversubscribed=True,
                     precision_emulated=True, throughput_ci95_pct=50.0),
                 row("failed", status="failed", measured_steps=1, oversubscribed=True))
    assert d.loc["x", "flags"] == ("few-steps, wide-ci, oversubscribed, "
                                   "emulated-precision, not-converged")
    assert d["low_confidence"].tolist() == [True, False]
    assert d.loc["failed", "flags"] == ""


def test_baseline_low_confidence():
    d = analysed(row("w1", measured_steps=5), row("w2", world_size=2),
                 row("b8-w1", batch_size=8), row("b8-w2", batch_size=8, world_size=2))
    assert d["baseline_low_confidence"].tolist() == [True, True, False, False]


def test_memory_prefers_the_workload_figure():
    d = analysed(row("new", peak_mem_mb=700.0, mem_workload_mb=80.0,
                     peak_mem_source="host_peak_rss"),
                 row("old", batch_size=8, peak_mem_mb=650.0,
                     peak_mem_source="host_peak_rss"),
                 row("none", batch_size=16))
    assert d["memory_mb"].tolist()[:2] == [80.0, 650.0]
    assert d["memory_source"].tolist() == ["workload", "host_peak_rss", None]
    assert math.isnan(d.loc["none", "memory_mb"])


# --------------------------------------------------------------------------- judgements


def test_pareto_front_keeps_flagged_runs_off():
    times = [10, 20, 30, 15, None, 20, 5]
    scores = [0.5, 0.6, 0.55, 0.5, 0.9, 0.6, 0.9]
    rows = [row(f"r{i}", mode="both", batch_size=2 ** i, train_time_s=t, mIoU=s)
            for i, (t, s) in enumerate(zip(times, scores))]
    rows[6]["measured_steps"] = 2  # fastest and best, but low-confidence
    d = analysed(*rows)
    assert d["pareto"].tolist() == [True, True, False, False, False, False, False]
    assert A.pareto_front(d).tolist() == d["pareto"].tolist()
    # Without the flag it dominates everything.
    rows[6]["measured_steps"] = 40
    assert analysed(*rows)["pareto"].tolist() == [False] * 6 + [True]


def test_configurations_reduce_repeats_to_median():
    runs = ((10.0, 500.0), (10.4, 520.0), (10.2, 560.0))
    d = analysed(*(row(f"r{i}", repeat=i, throughput_img_s=t, peak_mem_mb=m)
                   for i, (t, m) in enumerate(runs)),
                 row("other", batch_size=8, measured_steps=3))
    conf = A.configurations(d)
    assert len(conf) == 2
    assert conf.loc[0, "throughput_img_s"] == pytest.approx(10.2)
    assert conf.loc[0, "peak_mem_mb"] == pytest.approx(520.0)
    assert conf.loc[0, "n_repeats"] == 3 and conf.loc[1, "n_repeats"] == 1
    assert conf["low_confidence"].tolist() == [False, True]


def best(df) -> dict[str, A.Best]:
    return {b.objective.split(" (")[0]: b for b in A.best_per_objective(df)}


def test_best_never_picks_a_flagged_row():
    d = analysed(row("w1", throughput_img_s=10.0, peak_mem_mb=600.0),
                 row("w2", world_size=2, throughput_img_s=19.0, peak_mem_mb=610.0),
                 row("fast", batch_size=8, world_size=2, throughput_img_s=50.0,
                     measured_steps=5, peak_mem_mb=100.0),
                 row("fast1", batch_size=8, throughput_img_s=15.0))
    b = best(d)
    assert b["Highest throughput"].row["run_id"] == "w2"
    assert b["Highest throughput"].excluded == 1
    assert b["Lowest peak memory"].row["run_id"] == "w1"
    eff = b["Best scaling efficiency at the largest worker count"]
    assert eff.row["run_id"] == "w2" and eff.objective.endswith("(2)")
    assert b["Best mIoU"].row is None and "accuracy" in b["Best mIoU"].note


def test_best_all_flagged_says_why():
    d = analysed(row("w1", measured_steps=3), row("w2", world_size=2, measured_steps=3))
    b = best(d)["Highest throughput"]
    assert b.row is None and b.excluded == 2
    assert b.note == "all 2 candidate configuration(s) are low-confidence (few-steps)"
    # A sound 2-worker run whose 1-worker baseline is flagged has no efficiency to pick.
    d = analysed(row("w1", measured_steps=3), row("w2", world_size=2))
    eff = best(d)["Best scaling efficiency at the largest worker count"]
    assert eff.row is None and "baseline" in eff.note


def test_a_run_that_did_not_converge_still_has_a_throughput_but_no_best_accuracy():
    acc = dict(mode="both", train_loss_first=2.0)
    d = analysed(row("fast", throughput_img_s=50.0, mIoU=0.05, train_loss_last=2.1,
                     batch_size=8, **acc),
                 row("good", throughput_img_s=20.0, mIoU=0.60, train_loss_last=0.5, **acc))
    assert d.loc["fast", "flags"] == "not-converged"
    b = best(d)
    assert b["Highest throughput"].row["run_id"] == "fast"  # the measurement is sound
    assert b["Best mIoU"].row["run_id"] == "good"
    assert not d.loc["fast", "pareto"]


# --------------------------------------------------------------------------- caveats


def test_caveats_name_each_condition_that_applies():
    d = analysed(row("w1", hw_parallel_limit=2),
                 row("w4", world_size=4, hw_parallel_limit=2, oversubscribed=True,
                     throughput_img_s=20.0, throughput_ci95_pct=2.0),
                 row("bf", precision="bf16", precision_emulated=True))
    texts = C.caveats(d, {"accelerator": "cpu"})
    assert texts[0].startswith("CPU host")
    over = next(t for t in texts if "oversubscribed" in t)
    assert over.startswith("1 run oversubscribed") and "(2×)" in over
    assert any("emulates" in t and "bf16" in t for t in texts)
    assert not any("too few samples" in t for t in texts)
    assert C.caveats(d, {"accelerator": "cpu"}, "accuracy") == []
    gpu = analysed(row("g", device_type="cuda", throughput_ci95_pct=2.0))
    assert C.caveats(gpu, {"accelerator": "cuda"}) == []


def test_caveats_spread_and_memory():
    d = analysed(row("a", measured_steps=3, peak_mem_mb=600.0))
    speed = C.caveats(d, {}, "speed")
    assert any("1 run rest on too few samples" in t for t in speed)
    assert any("No confidence interval recorded" in t for t in speed)
    mem = C.caveats(d, {}, "memory")
    assert len(mem) == 2 and "peak RSS" in mem[1]
    d = analysed(row("a", peak_mem_mb=600.0, mem_workload_mb=50.0, throughput_ci95_pct=1.0))
    assert "above the process baseline" in C.caveats(d, {}, "memory")[1]


def acc_rows(rule: str | None, budgets=(136, 136)) -> pd.DataFrame:
    extra = {} if rule is None else {"lr_scaling": rule, "base_lr": 0.003}
    return analysed(
        row("w1", mode="both", mIoU=0.6, lr=0.003, steps=34, samples_seen=budgets[0],
            **extra),
        row("w2", world_size=2, mode="both", mIoU=0.55, steps=17, samples_seen=budgets[1],
            lr=0.006 if rule == "linear" else 0.003, **extra))


def test_accuracy_caveats_lr_rule_and_budget():
    none = C.caveats(acc_rows(None), {}, "accuracy")
    assert len(none) == 1 and "without an lr scaling rule" in none[0]
    assert len(C.caveats(acc_rows("none"), {}, "accuracy")) == 1
    assert C.caveats(acc_rows("linear"), {}, "accuracy") == []
    uneven = C.caveats(acc_rows("linear", budgets=(136, 64)), {}, "accuracy")
    assert len(uneven) == 1 and "budget" in uneven[0]
    text = C.accuracy_budget(acc_rows("linear"))
    assert text == ("Budget (samples seen): 1 worker: 136 samples in 34 steps at lr 0.003; "
                    "2 workers: 136 samples in 17 steps at lr 0.006. lr rule: linear.")
    assert C.accuracy_budget(analysed(row("t"))) is None


def test_accuracy_caveat_not_converged():
    d = analysed(row("w1", mode="both", mIoU=0.6), row("b8", batch_size=8, mode="both",
                                                        mIoU=0.05))
    texts = C.caveats(d, {}, "accuracy")
    assert len(texts) == 1 and texts[0].startswith("1 run did not converge")


def test_budget_estimate_without_samples_seen():
    d = analysed(row("a", steps=10, global_batch_size=8))
    budget, source = C.sample_budget(d)
    assert budget.tolist() == [80.0] and source == "steps × global batch"


# --------------------------------------------------------------------------- annotate


def test_annotate_returns_json_ready_copies():
    rows = [row("w1", noisy=True), row("w2", world_size=2, throughput_img_s=19.0,
                                       measured_steps=5),
            {"run_id": "bad", "status": "oom", "error": "OOM"}]
    before = json.dumps(rows)
    out = A.annotate(rows)
    assert json.dumps(rows) == before  # the input is left alone
    assert [r["run_id"] for r in out] == ["w1", "w2", "bad"]
    assert "noisy" not in out[0]  # replaced by low_confidence + flags
    assert out[1]["speedup"] == pytest.approx(1.9) and out[1]["flags"] == "few-steps"
    assert out[1]["low_confidence"] is True and out[0]["low_confidence"] is False
    assert out[2]["speedup"] is None and out[2]["flags"] == ""
    assert set(A.ANNOTATION_COLUMNS) <= set(out[0])
    json.dumps(out, allow_nan=False)  # NaN became None
    assert A.annotate([]) == []


def test_family_keys_and_norm():
    df = pd.DataFrame([row("a"), row("b", strong_scaling=True, global_batch_size=16)])
    keys = A.family_keys(df, ["engine", "batch_size", "missing"])
    assert keys == [("ddp", 4, None), ("ddp", ("global", 16), None)]
    assert A.norm(np.float64(8.0)) == 8 and A.norm(" ") is None and A.norm("False") is False
    assert sorted([None, "b", 2, 1.5], key=A.sort_key) == [1.5, 2, "b", None]


def test_a_lead_inside_the_noise_is_a_tie_not_a_winner():
    """39.6 vs 39.2 img/s (the engines folder): a 1 % lead inside +/-1 % CIs and an
    unknown run-to-run spread is a tie; 50 vs 39 is a winner; measured repeats replace
    the assumed spread."""
    def row(rid, engine, thr, ci=1.0, repeat=None):
        r = {"run_id": rid, "status": "ok", "engine": engine, "world_size": 1,
             "batch_size": 8, "measured_steps": 30, "throughput_img_s": thr,
             "throughput_ci95_pct": ci, "mode": "throughput"}
        return r if repeat is None else {**r, "repeat": repeat}

    tie = A.best_per_objective(pd.DataFrame([row("a", "ddp", 39.2), row("b", "fsdp", 39.6)]))[0]
    assert tie.row["run_id"] == "b" and tie.ties == ("a",) and not tie.spread_measured
    assert tie.lead_pct == pytest.approx(100 * 0.4 / 39.2)
    assert tie.noise_pct == pytest.approx(math.hypot(1, 1) + A.RUN_TO_RUN_PCT)
    win = A.best_per_objective(pd.DataFrame([row("a", "ddp", 39.0), row("b", "fsdp", 50.0)]))[0]
    assert win.row["run_id"] == "b" and win.ties == () and win.lead_pct > win.noise_pct
    # Two repeats each, 0.5 % apart: the measured spread, not the assumed one.
    reps = [row("a0", "ddp", 39.0, 0.2, 0), row("a1", "ddp", 39.2, 0.2, 1),
            row("b0", "fsdp", 41.0, 0.2, 0), row("b1", "fsdp", 41.2, 0.2, 1)]
    best = A.best_per_objective(pd.DataFrame(reps))[0]
    assert best.spread_measured and best.ties == () and best.row["engine"] == "fsdp"


def test_an_mfu_above_one_is_a_flag_not_a_value():
    base = {"status": "ok", "engine": "ddp", "world_size": 1, "measured_steps": 30,
            "throughput_img_s": 10.0, "throughput_ci95_pct": 1.0, "mode": "throughput"}
    rows = A.annotate([{**base, "run_id": "a", "batch_size": 2, "mfu": 1.36},
                       {**base, "run_id": "b", "batch_size": 4, "mfu": 0.4,
                        "mfu_gemm": 1.2},
                       {**base, "run_id": "c", "batch_size": 8, "mfu": 0.4}])
    flags = {r["run_id"]: r["flags"] for r in rows}
    assert "impossible-mfu" in flags["a"] and "impossible-mfu" in flags["b"]
    assert "impossible-mfu" not in flags["c"]


def test_engines_compare_against_one_common_baseline():
    """ZeRO-2's own 1-worker run is 6.4 % slower than DDP's: its efficiency against
    itself (0.95) beats DDP's (0.90), but against the common DDP baseline it is 0.89."""
    rows = [row("d1", throughput_img_s=40.0), row("d2", world_size=2, throughput_img_s=72.0),
            row("z1", engine="deepspeed", zero_stage=2, throughput_img_s=37.44),
            row("z2", engine="deepspeed", zero_stage=2, world_size=2,
                throughput_img_s=71.2)]
    d = analysed(*rows)
    assert d.loc["z2", "scaling_efficiency"] == pytest.approx(71.2 / 37.44 / 2)
    assert d.loc["z2", "common_efficiency"] == pytest.approx(71.2 / 40.0 / 2)
    assert d.loc["z2", "common_baseline"] == "ddp/torch"
    assert d.loc["d2", "common_speedup"] == pytest.approx(1.8)
    eff = A.best_per_objective(pd.DataFrame(rows))[1]
    assert eff.column == "common_efficiency" and "common" in eff.objective
    assert eff.row["run_id"] == "d2" and eff.ties == ("z2",)  # 0.90 vs 0.89: a tie
    # one engine only: each family's own baseline, as before
    one = A.best_per_objective(pd.DataFrame(rows[:2]))[1]
    assert one.column == "scaling_efficiency"


def test_lowest_host_memory_is_named_only_beyond_its_spread():
    """CPU peak RSS of identical configurations moved 65 %: a 0.6 % lead is a tie, an
    allocator (GPU) figure keeps the ordinary run-to-run noise."""
    rows = [row("a", batch_size=4, mem_workload_mb=100.0, peak_mem_source="host_peak_rss"),
            row("b", batch_size=8, mem_workload_mb=100.6, peak_mem_source="host_peak_rss")]
    best = A.best_per_objective(pd.DataFrame(rows))[2]
    assert best.ties == ("b",) and best.noise_pct == pytest.approx(A.HOST_MEMORY_SPREAD_PCT)
    gpu = [dict(r, mem_workload_mb=None, peak_mem_mb=m, peak_mem_source="allocator",
                device_type="cuda") for r, m in zip(rows, (100.0, 150.0))]
    best = A.best_per_objective(pd.DataFrame(gpu))[2]
    assert best.row["run_id"] == "a" and best.ties == ()

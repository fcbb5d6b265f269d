"""Tests of segcore.results.plots, report and launch/plot.py on synthetic result tables and
on the committed results folders."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from segcore.io import write_json_atomic
from segcore.results import analysis, caveats, labels, panels, plots, report
from segcore.results.rows import append_row, read_rows, write_rows

ROOT = Path(__file__).resolve().parents[1]
PNGS = [f"{n}.png" for n in plots.PLOT_NAMES]


def ok_row(run_id: str, **kw) -> dict:
    """An ok result row with the configuration columns a real run writes."""
    r = {"sweep_id": "cpu-test", "run_id": run_id, "status": "ok", "error": "",
         "engine": "ddp", "zero_stage": 0, "loader": "torch", "precision": "fp32",
         "channels_last": True, "compile": False, "world_size": 1, "nnodes": 1,
         "device_type": "cpu", "device_name": "Test CPU", "batch_size": 4,
         "arch": "modern", "depth": 3, "widths": "16-32-64", "image_size": 64,
         "class_scheme": "six", "num_classes": 6, "mode": "throughput", "strong_scaling": False,
         "throughput_img_s": 10.0, "peak_mem_source": "host_peak_rss"}
    r.update(kw)
    r.setdefault("global_batch_size", r["batch_size"] * r["world_size"])
    return r


def fake_env(folder: Path, cpu: bool = True, commit: str = "0123456789abcdef",
             sweep_id: str = "cpu-test") -> dict:
    env = {"accelerator": "cpu" if cpu else "cuda", "sweep_id": sweep_id,
           "cpu_model": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "cpu_count": 2,
           "cpu_affinity_count": 2, "mem_total_mb": 8192.0, "python_version": "3.12.3",
           "cpu_id": {"vendor": "GenuineIntel", "family": 6, "model": 143, "stepping": 8},
           "torch_version": "2.13.0+cpu", "cuda_version": None, "host_count": 1,
           "git_commit": commit, "git_dirty": False, "hostname": "testhost",
           "timestamp_utc": "2025-01-01T00:00:00+00:00",
           "command_line": "python launch/sweep.py --gpus 1,2,4 --batch-sizes 4,8",
           "cuda_devices": [] if cpu else [{"index": 0, "name": "NVIDIA H100 80GB HBM3",
                                            "memory_mb": 81559.0}]}
    write_json_atomic(folder / "env.json", env)
    return env


def make_sweep(folder: Path, cpu: bool = True, commit: str = "0123456789abcdef",
               speed: float = 1.0, bulk: bool = False) -> Path:
    """A realistic small sweep: 2 engine families x depth 3,4 x batch 4,8 x 1,2,4 workers,
    two configurations with 3 repeats (one noisy, one quiet), accuracy for depth 4 only,
    and an oom, a failed, a timeout and a skipped row. Rows are appended one by one as the sweep does,
    or with ``bulk`` written at once (faster)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    add = rows.append if bulk else (lambda r: append_row(folder, r))
    for engine, stage, prec in (("ddp", 0, "fp32"), ("deepspeed", 2, "bf16")):
        for depth, widths in ((3, "16-32-64"), (4, "16-32-64-128")):
            for batch in (4, 8):
                for ws in (1, 2, 4):
                    # Repeats: a noisy configuration (10 % apart) and a quiet one (1 %).
                    noisy = (engine, depth, batch) == ("ddp", 3, 8)
                    quiet = (engine, depth, batch) == ("deepspeed", 3, 8)
                    repeats = 3 if noisy or quiet else 1
                    for r in range(repeats):
                        tp = speed * batch * 3 / depth * ws * (1 - 0.05 * (ws - 1)) \
                            * (1 + (0.1 if noisy else 0.01) * r)
                        acc = depth == 4
                        row = ok_row(
                            f"w{ws}-{engine}{stage}-d{depth}-b{batch}"
                            + (f"-r{r}" if repeats > 1 else ""),
                            engine=engine, zero_stage=stage, precision=prec,
                            world_size=ws, batch_size=batch, depth=depth, widths=widths,
                            repeat=r, throughput_img_s=tp, step_ms_p50=1000 * batch / tp,
                            step_ms_p99=1300 * batch / tp, data_wait_pct=2.0 + ws,
                            peak_mem_mb=300 + 20 * batch * depth,
                            launch_overhead_s=3.0 + ws + 0.1 * r,
                            train_time_s=600 / tp if acc else None,
                            mIoU=0.4 + 0.01 * batch + rng.uniform(0, 0.02) if acc else None,
                            mDice=0.5 + 0.01 * batch if acc else None,
                            time_to_target_s=300 / tp if acc else None, target_miou=0.4,
                            measured_steps=40, mode="both" if acc else "throughput")
                        add(row)
    fails = [("oom", "CUDA out of memory. Tried to allocate 2.00 GiB"),
             ("failed", "RuntimeError: gloo | connection reset by peer\nTraceback ..."),
             ("timeout", "no progress for 1800 s"),
             ("skipped", "world size 8 exceeds the 4 devices")]
    for i, (status, error) in enumerate(fails):
        add({"sweep_id": "cpu-test", "run_id": f"bad-{status}", "status": status,
             "error": error, "engine": "ddp", "world_size": 4, "batch_size": 64 + i,
             "depth": 4})
    if bulk:
        write_rows(folder, rows)
    fake_env(folder, cpu=cpu, commit=commit)
    return folder


def assert_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width > 300 and im.height > 200
        im.verify()


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> tuple[Path, dict[str, plots.PlotResult]]:
    """The realistic sweep with its plots and report, written once for several tests
    (as the sweep's end does: plot_all, then write_report with those figures)."""
    folder = make_sweep(tmp_path_factory.mktemp("sweep") / "cpu-test")
    res = plots.plot_all(read_rows(folder), folder / "plots",
                         labels.describe_context(read_rows(folder),
                                                 caveats.read_env(folder)))
    report.write_report(folder, res)
    return folder, res


@pytest.fixture
def sweep(drawn) -> Path:
    return drawn[0]


# --------------------------------------------------------------------------- figures


def test_plot_all_writes_every_figure_with_data(drawn):
    folder, res = drawn
    assert list(res) == list(plots.PLOT_NAMES)
    assert {k: v.note for k, v in res.items()} == {k: None for k in plots.PLOT_NAMES}
    for name in PNGS:
        assert res[name[:-4]].path == folder / "plots" / name
        assert_png(folder / "plots" / name)


def test_describe_rows_names_only_what_varies(sweep):
    df = read_rows(sweep)
    ok = df[df["status"] == "ok"]
    text = labels.describe_rows(ok)
    assert "deepspeed ZeRO-2, bf16, batch 4, depth 3, 1 worker" in text
    assert not any("channels" in t or "six" in t or "Test CPU" in t for t in text)


SPARSE = {
    "empty": ([], "no rows"),
    "single_row": ([ok_row("only")], "one worker count"),
    "all_failed": ([{"run_id": "a", "status": "failed", "error": "boom"},
                    {"run_id": "b", "status": "oom", "error": "OOM"}],
                   "no successful (status ok) runs; found 1 failed, 1 oom"),
    "no_accuracy": ([ok_row(f"w{w}", world_size=w, throughput_img_s=9.0 * w)
                     for w in (1, 2)], None),
    "no_baseline": ([ok_row(f"w{w}", world_size=w, nnodes=2) for w in (2, 4)],
                    "no 1-worker baseline"),
    "nan_everywhere": ([{"run_id": "x", "status": "ok"},
                        {"run_id": "y", "status": "ok", "world_size": None,
                         "throughput_img_s": None, "mIoU": None}], "one worker count"),
}


@pytest.mark.parametrize("case", sorted(SPARSE))
def test_sparse_tables_do_not_crash(tmp_path, case):
    rows, speedup_note = SPARSE[case]
    for r in rows:
        append_row(tmp_path, r)
    res = plots.plot_all(read_rows(tmp_path), tmp_path / "plots")
    for name in PNGS:
        assert_png(tmp_path / "plots" / name)
    if speedup_note is None:
        assert res["speedup"].note is None
    else:
        assert speedup_note in res["speedup"].note
    assert res["accuracy_vs_depth"].note  # no case has accuracy
    assert res["pareto"].note
    path = report.write_report(tmp_path, res)
    assert path.read_text().startswith("# Benchmark report")


# --------------------------------------------------------------------------- report


def test_report_sections(sweep):
    text = (sweep / "report.md").read_text()
    assert text.startswith("# Benchmark report: cpu-test\n")
    assert "CPU timings show code paths and relative effects, not GPU performance" in text
    for header in ("## Hardware and software", "## Best configuration per objective",
                   "## Results", "## Accuracy", "## Low-confidence figures",
                   "## Failed, out-of-memory and timed-out runs", "## Launch overhead",
                   "## Plots"):
        assert header in text, header
    for objective in ("Highest throughput", "Best scaling efficiency at the largest worker "
                      "count (4)", "Lowest peak memory", "Best mIoU",
                      "Fastest time to target mIoU"):
        assert f"| {objective} " in text, objective
    # Environment: CPU model, versions, commit and command line.
    assert "Intel(R) Xeon(R) Platinum 8481C" in text and "2.13.0+cpu" in text
    assert "0123456789ab" in text
    assert "python launch/sweep.py --gpus 1,2,4 --batch-sizes 4,8" in text
    # Every figure embedded by a relative link.
    for name in PNGS:
        assert f"](plots/{name})" in text
        assert_png(sweep / "plots" / name)


def test_report_best_values(sweep):
    text = (sweep / "report.md").read_text()
    best = {b.objective.split(" (")[0]: b for b in
            analysis.best_per_objective(read_rows(sweep))}
    top = best["Highest throughput"].row
    # 4 workers, batch 8, depth 3: the fastest configuration; the noisy DDP one is as
    # fast but flagged, so the quiet DeepSpeed one (median of its repeats) wins.
    assert (top["world_size"], top["batch_size"], top["depth"]) == (4, 8, 3)
    assert top["engine"] == "deepspeed" and top["n_repeats"] == 3
    assert best["Highest throughput"].excluded == 3
    assert f"| {top['throughput_img_s']:.1f} img/s " in text
    assert "median of 3 repeats" in text
    eff = best["Best scaling efficiency at the largest worker count"].row
    assert eff["world_size"] == 4 and not eff["low_confidence"]
    assert best["Lowest peak memory"].row["peak_mem_mb"] == 300 + 20 * 4 * 3
    assert best["Best mIoU"].row["depth"] == 4


def test_report_failed_rows_noise_and_launch(sweep):
    text = (sweep / "report.md").read_text()
    failed = text.split("## Failed")[1].split("## Launch")[0]
    assert "| bad-oom " in failed and "CUDA out of memory. Tried to allocate 2.00 GiB" in failed
    # The error's pipe is escaped and its lines joined, so the table stays one row each.
    assert "gloo \\| connection reset by peer ⏎ Traceback ..." in failed
    assert "| timeout " in failed and "no progress for 1800 s" in failed
    assert "bad-skipped" in failed and "world size 8 exceeds the 4 devices" in failed
    flagged = text.split("## Low-confidence figures")[1].split("## Failed")[0]
    assert "⚠ 9 of 36 ok run(s) flagged" in flagged
    assert "- `wide-ci`: " in flagged and "- `few-steps`" not in flagged
    assert flagged.count("| w4-ddp0-d3-b8-r") == 3
    assert "18.2 %" in flagged  # (1.2 - 1.0) / 1.1 of the median
    results = text.split("## Results")[1].split("## Accuracy")[0]
    assert results.count("⚠ wide-ci") == 9
    df = read_rows(sweep)
    median = statistics.median(df["launch_overhead_s"].dropna())
    launch = text.split("## Launch overhead")[1].split("## Plots")[0]
    assert f"Median **{median:.1f} s**" in launch


def test_report_gpu_folder_has_no_cpu_note(tmp_path):
    for w in (1, 2):
        append_row(tmp_path, ok_row(f"w{w}", world_size=w, device_type="cuda",
                                    peak_mem_source="allocator", mode="throughput"))
    fake_env(tmp_path, cpu=False)
    text = report.write_report(tmp_path).read_text()
    assert "CPU timings" not in text
    assert "1 × NVIDIA H100 80GB HBM3 (80 GiB)" in text
    assert "No confidence interval recorded and no repeats" in text
    assert "## Accuracy\n" not in text  # throughput-only rows


def test_report_without_env_json(tmp_path):
    append_row(tmp_path, ok_row("a"))
    text = report.write_report(tmp_path).read_text()
    assert "env.json is missing" in text
    assert "CPU timings" in text  # device_type in the rows says cpu


def test_markdown_table():
    t = report.markdown_table(["a", "num"], [["x|y", 1.5], [None, "line1\nline2"]],
                              ["l", "r"])
    assert t.splitlines() == [
        "| a    |           num |",
        "| ---- | ------------: |",
        "| x\\|y |           1.5 |",
        "| –    | line1 ⏎ line2 |",
    ]


# --------------------------------------------------------------------------- comparing


def test_folder_labels(tmp_path):
    a = make_env_folder(tmp_path / "a", commit="aaaaaaa111")
    b = make_env_folder(tmp_path / "b", commit="bbbbbbb222")
    assert labels.folder_labels([a, b]) == ["cpu-2c-intel-xeon-8481c-f6m143 @ aaaaaaa",
                                           "cpu-2c-intel-xeon-8481c-f6m143 @ bbbbbbb"]
    c = make_env_folder(tmp_path / "c", commit="aaaaaaa111")
    names = labels.folder_labels([a, c])
    assert len(set(names)) == 2 and "(a)" in names[0] and "(c)" in names[1]
    d = make_env_folder(tmp_path / "d", cpu=False)
    assert labels.folder_labels([a, d]) == ["cpu-2c-intel-xeon-8481c-f6m143", "1xH100-80GB"]


def make_env_folder(folder: Path, cpu: bool = True, commit: str = "0123456789") -> Path:
    folder.mkdir(parents=True)
    fake_env(folder, cpu=cpu, commit=commit)
    return folder


# --------------------------------------------------------------------------- launcher


def load_launcher():
    spec = importlib.util.spec_from_file_location("launch_plot", ROOT / "launch" / "plot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_launch_plot_one_folder(tmp_path, capsys):
    folder = tmp_path / "small"
    for w, t in ((1, 10.0), (2, 19.0), (4, 36.0)):
        append_row(folder, ok_row(f"w{w}", world_size=w, throughput_img_s=t))
    fake_env(folder)
    before = (folder / "runs.jsonl").read_bytes()
    assert load_launcher().main([str(folder)]) == 0
    assert (folder / "report.md").is_file()
    for name in PNGS:
        assert_png(folder / "plots" / name)
    assert (folder / "runs.jsonl").read_bytes() == before  # the table is only read
    assert "report.md" in capsys.readouterr().out
    assert re.search(r"\|\s+3\.60×\s+\|\s+90 %\s+\|", (folder / "report.md").read_text())


def test_launch_plot_compares_folders(sweep, tmp_path):
    other = make_sweep(tmp_path / "gpu", cpu=False, commit="fedcba9876543210", speed=20.0,
                       bulk=True)
    out = tmp_path / "cmp"
    # A CPU folder beside a GPU folder is a comparison across hardware: refused unless asked.
    assert load_launcher().main([str(sweep), str(other), "--out", str(out)]) == 2
    assert not out.exists()
    assert load_launcher().main([str(sweep), str(other), "--out", str(out),
                                 "--mixed-hardware"]) == 0
    for name in PNGS:
        assert_png(out / name)
    text = (out / "compare.md").read_text()
    assert "cpu-2c-intel-xeon-8481c" in text and "1xH100-80GB" in text
    assert "CPU timings show code paths and relative effects" in text
    assert re.search(r"\]\(speedup\.png\)", text)


def test_launch_plot_refuses_unidentified_or_different_hardware(tmp_path, capsys):
    folders = []
    for name in ("a", "b"):
        folder = tmp_path / name
        append_row(folder, ok_row("w1"))
        fake_env(folder)
        folders.append(str(folder))
    plot = load_launcher()
    assert plot.main(folders + ["--out", str(tmp_path / "same")]) == 0  # same machine
    env = json.loads((tmp_path / "b" / "env.json").read_text())
    env["cpu_id"]["model"] = 207  # same marketing name, another generation
    write_json_atomic(tmp_path / "b" / "env.json", env)
    capsys.readouterr()
    assert plot.main(folders + ["--out", str(tmp_path / "diff")]) == 2
    err = capsys.readouterr().err.strip()
    assert "different hardware" in err and "f6m143" in err and "f6m207" in err
    assert "\n" not in err and "--mixed-hardware" in err
    del env["cpu_id"]  # a folder from before the identity was recorded
    write_json_atomic(tmp_path / "b" / "env.json", env)
    assert plot.main(folders + ["--out", str(tmp_path / "unk")]) == 2
    assert "not identified" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "no_jsonl"])
def test_launch_plot_errors(tmp_path, capsys, case):
    folder = tmp_path / "nothing"
    if case == "no_jsonl":
        folder.mkdir()
    assert load_launcher().main([str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert ("no such folder" if case == "missing" else "no runs.jsonl") in err


# --------------------------------------------------------------------------- drawing


@pytest.fixture
def figures(monkeypatch) -> dict[str, object]:
    """Every figure drawn, by PNG stem, kept for inspection instead of only saved."""
    kept: dict[str, object] = {}
    save = panels.save

    def keep(fig, path):
        kept[Path(path).stem] = fig
        save(fig, path)

    # Both the panel grids (panels.render) and the Pareto figure save through it.
    monkeypatch.setattr(panels, "save", keep)
    monkeypatch.setattr(plots, "save", keep)
    return kept


def axes_lines(fig) -> list:
    return [ln for ax in fig.axes for ln in ax.get_lines()]


def hollow_points(fig) -> int:
    from matplotlib.colors import to_rgba

    return sum(len(ln.get_xdata()) for ln in axes_lines(fig)
               if ln.get_marker() not in (None, "None", "")
               and to_rgba(ln.get_markerfacecolor()) == to_rgba("white"))


def scaling_rows(**w4) -> list[dict]:
    rows = [ok_row("w1", throughput_img_s=10.0, measured_steps=40),
            ok_row("w2", world_size=2, throughput_img_s=19.0, measured_steps=40)]
    rows.append(ok_row("w4", world_size=4, throughput_img_s=20.0, **w4))
    return rows


def test_low_confidence_points_are_hollow(tmp_path, figures):
    plots.plot_speedup(pd.DataFrame(scaling_rows(measured_steps=3)),
                       tmp_path / "speedup.png")
    fig = figures["speedup"]
    assert hollow_points(fig) == 1
    assert any(t.get_text() == panels.HOLLOW for t in fig.axes[0].get_legend().get_texts())
    plots.plot_speedup(pd.DataFrame(scaling_rows(measured_steps=40)),
                       tmp_path / "speedup.png")
    assert hollow_points(figures["speedup"]) == 0


def test_speedup_draws_ideal_and_hardware_ceiling(tmp_path, figures):
    rows = [dict(r, hw_parallel_limit=2) for r in scaling_rows(oversubscribed=True)]
    plots.plot_speedup(pd.DataFrame(rows), tmp_path / "speedup.png")
    plots.plot_efficiency(pd.DataFrame(rows), tmp_path / "efficiency.png")
    lines = axes_lines(figures["speedup"])
    ideal = [ln for ln in lines if ln.get_linestyle() == "--"]
    ceiling = [ln for ln in lines if ln.get_color() == plots._CEILING_COLOUR]
    assert list(ideal[0].get_ydata()) == [1, 4]
    assert list(ceiling[0].get_xdata()) == [1, 2, 4]
    assert list(ceiling[0].get_ydata()) == [1, 2, 2]
    eff = [ln for ln in axes_lines(figures["efficiency"])
           if ln.get_color() == plots._CEILING_COLOUR]
    assert list(eff[0].get_ydata()) == [100, 100, 50]
    # Without the column there is no ceiling line.
    plots.plot_speedup(pd.DataFrame(scaling_rows()), tmp_path / "speedup.png")
    assert not [ln for ln in axes_lines(figures["speedup"])
                if ln.get_color() == plots._CEILING_COLOUR]


def error_bars(fig) -> list[tuple[float, float]]:
    """(low, high) of every vertical error bar drawn."""
    out = []
    for ax in fig.axes:
        for coll in ax.collections:
            for seg in coll.get_segments():
                out.append((float(seg[:, 1].min()), float(seg[:, 1].max())))
    return sorted(out)


def test_error_bars_from_confidence_intervals(tmp_path, figures):
    rows = [ok_row(f"b{b}", batch_size=b, throughput_img_s=t, throughput_ci95_lo=t - 1,
                   throughput_ci95_hi=t + 2, measured_steps=40)
            for b, t in ((4, 10.0), (8, 16.0))]
    plots.plot_throughput_vs_batch(pd.DataFrame(rows), tmp_path / "tp.png")
    assert error_bars(figures["tp"]) == [(9.0, 12.0), (15.0, 18.0)]
    for r in rows:
        del r["throughput_ci95_lo"], r["throughput_ci95_hi"]
    plots.plot_throughput_vs_batch(pd.DataFrame(rows), tmp_path / "tp.png")
    assert error_bars(figures["tp"]) == []  # no CI, no repeats: no bar


def test_memory_plot_uses_the_workload_figure(tmp_path, figures):
    rows = [ok_row(f"b{b}", batch_size=b, peak_mem_mb=650.0 + b, mem_workload_mb=10.0 * b,
                   measured_steps=40) for b in (4, 8)]
    res = plots.plot_memory(pd.DataFrame(rows), tmp_path / "memory.png")
    assert res.note is None
    ys = sorted({float(y) for ln in axes_lines(figures["memory"]) for y in ln.get_ydata()})
    assert ys == [40.0, 80.0]
    assert "workload" in figures["memory"]._suptitle.get_text()
    for r in rows:
        del r["mem_workload_mb"]
    plots.plot_memory(pd.DataFrame(rows), tmp_path / "memory.png")
    ys = sorted({float(y) for ln in axes_lines(figures["memory"]) for y in ln.get_ydata()})
    assert ys == [654.0, 658.0]


def test_pareto_front_leaves_flagged_runs_off(tmp_path, figures):
    rows = [ok_row("slow-good", mode="both", batch_size=4, mIoU=0.6, train_time_s=20.0,
                   measured_steps=40),
            ok_row("fast-ok", mode="both", batch_size=8, mIoU=0.5, train_time_s=10.0,
                   measured_steps=40),
            # Fastest and most accurate, but on 5 steps: hollow, not on the front.
            ok_row("fast-flagged", mode="both", batch_size=16, mIoU=0.7, train_time_s=5.0,
                   measured_steps=5)]
    plots.plot_pareto(pd.DataFrame(rows), tmp_path / "pareto.png")
    ax = figures["pareto"].axes[0]
    step = [ln for ln in ax.get_lines() if ln.get_drawstyle() == "steps-post"]
    assert list(step[0].get_xdata()) == [10.0, 20.0]
    hollow = [c for c in ax.collections if len(c.get_offsets()) and len(c.get_facecolor())
              and tuple(c.get_facecolor()[0][:3]) == (1, 1, 1)]
    assert [tuple(c.get_offsets()[0]) for c in hollow] == [(5.0, 0.7)]


# --------------------------------------------------------------------------- report


def test_report_ci_ceiling_caveats_and_accuracy(tmp_path):
    folder = tmp_path / "new"
    rows = [ok_row("w1", mode="both", hw_parallel_limit=2, throughput_ci95_pct=2.0,
                   measured_steps=40, mIoU=0.62, steps=34, samples_seen=136, lr=0.003,
                   base_lr=0.003, lr_scaling="linear", train_time_s=5.0,
                   time_to_target_s=5.0, target_miou=0.6),
            ok_row("w2", world_size=2, mode="both", hw_parallel_limit=2,
                   throughput_img_s=19.0, throughput_ci95_pct=2.0, measured_steps=40,
                   mIoU=0.61, steps=17, samples_seen=136, lr=0.006, base_lr=0.003,
                   lr_scaling="linear", train_time_s=3.0, time_to_target_s=2.5,
                   target_miou=0.6),
            ok_row("w4", world_size=4, mode="both", hw_parallel_limit=2,
                   oversubscribed=True, throughput_img_s=21.0, throughput_ci95_pct=2.0,
                   measured_steps=40, mIoU=0.1, steps=9, samples_seen=136, lr=0.012,
                   base_lr=0.003, lr_scaling="linear", train_time_s=4.0,
                   target_miou=0.6)]
    write_rows(folder, rows)
    fake_env(folder)
    text = report.write_report(folder).read_text()
    results = text.split("## Results")[1].split("## Accuracy")[0]
    # The caveats sit between the section's text and its table.
    before_table = results.split("| ")[0]
    assert "> ⚠ CPU host" in before_table and "> ⚠ 1 run oversubscribed" in before_table
    assert re.search(r"\|\s+95 % CI \|", results) and "|  9.8–10.2 |" in results
    assert "| lr " not in results  # only the scaling rule varies lr: not a column
    # speedup | hw ceiling | efficiency
    assert re.search(r"\|\s+1\.90×\s+\|\s+2×\s+\|\s+95 %\s+\|", results)
    assert "⚠ oversubscribed, not-converged" in results
    accuracy = text.split("## Accuracy")[1].split("## Low-confidence")[0]
    assert ("**Budget (samples seen): 1 worker: 136 samples in 34 steps at lr 0.003; "
            "2 workers: 136 samples in 17 steps at lr 0.006; 4 workers: 136 samples in 9 "
            "steps at lr 0.012. lr rule: linear.**") in accuracy
    assert "> ⚠ 1 run did not converge" in accuracy
    assert "without an lr scaling rule" not in accuracy
    # time to target | quality speedup
    assert re.search(r"\|\s+2\.5\s+\|\s+2\.00×\s+\|", accuracy)
    flagged = text.split("## Low-confidence figures")[1].split("## Failed")[0]
    assert "| w4 " in flagged and "| w2 " not in flagged


# --------------------------------------------------------------------------- committed


COMMITTED = sorted(p.parent for p in (ROOT / "results").glob("*/runs.jsonl"))


@pytest.mark.parametrize("folder", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_results_still_redraw(folder, tmp_path, capsys):
    import shutil

    copy = tmp_path / folder.name
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("plots", "report.md"))
    before = (copy / "runs.jsonl").read_bytes()
    assert load_launcher().main([str(copy)]) == 0
    assert (copy / "runs.jsonl").read_bytes() == before
    for name in PNGS:
        assert_png(copy / "plots" / name)
    text = (copy / "report.md").read_text()
    assert "figure failed" not in text
    for header in ("## Best configuration per objective", "## Results",
                   "## Low-confidence figures"):
        assert header in text
    out = capsys.readouterr().out
    assert f"{copy}: " in out and "low-confidence" in out


def test_figures_never_average_two_configurations_into_one_point():
    """Two widths at one depth (the paper preset) are two lines of accuracy_vs_depth,
    not one averaged point; widths that follow depth stay out of the key."""
    from segcore.results import plots as P

    rows = [ok_row("a", depth=3, widths="16-32-64", mIoU=0.2, mode="both"),
            ok_row("b", depth=3, widths="16-64-128", mIoU=0.6, mode="both"),
            ok_row("c", depth=4, widths="16-32-64-128", mIoU=0.4, mode="both")]
    src = [(None, analysis.frame(pd.DataFrame(rows)))]
    cols = P._key_cols(analysis.family_columns(src[0][1]), ("depth", "widths", "params"),
                       with_world=True, sources=src)
    assert "widths" in cols and "depth" not in cols
    lines = P._collect(src, "depth", "mIoU", cols)
    points = sorted((float(x), float(y)) for ln in lines for x, y in zip(ln.x, ln.y))
    assert points == [(3.0, 0.2), (3.0, 0.6), (4.0, 0.4)]  # no 0.4 at depth 3
    follows = [r for r in rows if r["run_id"] != "b"]
    src = [(None, analysis.frame(pd.DataFrame(follows)))]
    assert "widths" not in P._key_cols(analysis.family_columns(src[0][1]),
                                       ("depth", "widths", "params"), with_world=True,
                                       sources=src)


def test_accuracy_figures_say_what_the_accuracy_rests_on():
    from segcore.results import plots as P

    d = analysis.frame(pd.DataFrame([ok_row("a", mIoU=0.3, val_images=12,
                                            data_source="synthetic")]))
    assert P.accuracy_basis([(None, d)]) == \
        "accuracy on 12 validation image(s) from synthetic scenes"
    old = analysis.frame(pd.DataFrame([ok_row("a", mIoU=0.3)]))
    assert "not recorded" in P.accuracy_basis([(None, old)])

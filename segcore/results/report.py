"""``report.md`` of a results folder: environment, best configurations, tables, plots.

The report only writes: every derived number (speedup, efficiency, the hardware
ceiling, CIs, low-confidence flags, best configurations, caveats) comes from
:mod:`segcore.results.analysis`, re-derived from ``runs.jsonl`` and ``env.json``
whenever the report is written, so ``python launch/plot.py RESULTS_DIR`` redraws it
from any results folder. Each caveat is printed beside the table it concerns. Tables
are written by a small formatter of our own: pandas' ``to_markdown`` needs
``tabulate``, which is not a dependency.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from segcore.host import hardware_tag
from segcore.fmt import DASH, fmt, markdown_table, missing
from segcore.io import write_text_atomic
from segcore.results import analysis, plots
from segcore.results.study import study_section
from segcore.results import caveats as cav
from segcore.results.analysis import norm, sort_key, truthy
from segcore.results.caveats import read_env
from segcore.results.labels import describe_context, describe_rows, folder_labels
from segcore.results.rows import read_rows

__all__ = ["markdown_table", "write_report", "write_compare"]

_FAILED = ("oom", "failed", "timeout", "diverged", "interrupted")
_DASH = DASH
# Configuration columns the results table may show (those that vary, see
# _config_columns); engine and ZeRO stage are shown as one column.
_TABLE_CONFIG = ("engine", "loader", "precision", "channels_last", "compile", "batch_size",
                 "global_batch_size", "arch", "widths", "depth", "image_size",
                 "class_scheme", "mode", "strong_scaling",
                 *analysis.OPTIONAL_FAMILY_COLUMNS, "world_size", "nnodes")
_MEM_SOURCE_TEXT = {"workload": "workload peak above the process baseline",
                    "allocator": "allocator peak", "host_peak_rss": "host peak RSS"}


# --------------------------------------------------------------------------- formatting


def _f(v: Any, spec: str, suffix: str = "", scale: float = 1.0) -> str | None:
    # None lets markdown_table write its dash.
    return None if missing(v) else fmt(float(v) * scale, spec, suffix)


def _text(v: Any) -> str | None:
    n = norm(v)
    if n is None:
        return None
    if isinstance(n, bool):
        return "yes" if n else "no"
    return str(n)


def _first_line(text: Any, limit: int = 300) -> str:
    s = " ⏎ ".join(line.strip() for line in str(text or "").strip().splitlines()
                   if line.strip())
    return s if len(s) <= limit else s[:limit - 1] + "…"


def _ci(r: pd.Series) -> str | None:
    lo, hi = _f(r.get("throughput_ci95_lo"), ".1f"), _f(r.get("throughput_ci95_hi"), ".1f")
    return f"{lo}–{hi}" if lo and hi else None


def _flags(r: pd.Series) -> str:
    return f"⚠ {r['flags']}" if r.get("flags") else ""


def _caveat_lines(texts: list[str]) -> list[str]:
    return [f"> ⚠ {t}" for t in texts] + ([""] if texts else [])


def _describe(rows: pd.DataFrame, reference: pd.DataFrame) -> list[str]:
    """Descriptions of ``rows`` naming what varies across ``reference`` (the sweep),
    always with workers, batch and depth."""
    both = pd.concat([reference, rows], ignore_index=True)
    text = describe_rows(both, always=("world_size", "batch_size", "depth"))
    return text[len(reference):]


# --------------------------------------------------------------------------- sections


def _versions(env: dict[str, Any], *keys: str) -> str:
    return " / ".join(str(env.get(k) or _DASH) for k in keys)


def _env_section(env: dict[str, Any]) -> list[str]:
    if not env:
        return ["## Hardware and software", "",
                "*env.json is missing: the hardware and software are not recorded.*", ""]
    devices = env.get("cuda_devices") or env.get("nvml_gpus") or []
    if devices:
        names: dict[str, int] = {}
        for dev in devices:
            mem = _f(dev.get("memory_mb"), ".0f", " GiB", scale=1 / 1024)
            name = f"{dev.get('name') or 'GPU'}" + (f" ({mem})" if mem else "")
            names[name] = names.get(name, 0) + 1
        dev_text = ", ".join(f"{n} × {name}" for name, n in names.items())
    else:
        dev_text = "none: CPU only (each worker is a CPU process, gloo backend)"
    cores = env.get("cpu_count")
    usable = env.get("cpu_affinity_count")
    cpu = f"{env.get('cpu_model') or 'unknown'}, {cores or '?'} cores" + (
        f" ({usable} usable)" if usable and usable != cores else "")
    ram = _f(env.get("mem_total_mb"), ".0f", " GiB RAM", scale=1 / 1024)
    if ram:
        cpu += f", {ram}"
    ident = env.get("cpu_id") if isinstance(env.get("cpu_id"), dict) else {}
    if ident:
        flags = set(ident.get("flags") or [])
        cpu += (f"; {ident.get('vendor', '?')} family {ident.get('family', '?')} model "
                f"{ident.get('model', '?')} stepping {ident.get('stepping', '?')}; "
                + ("bf16 native (avx512_bf16)" if flags & {"avx512_bf16", "amx_bf16"}
                   else "bf16 emulated (no avx512_bf16 / amx)")
                + ("" if not flags else f"; flags {', '.join(sorted(flags))}"))
    else:
        cpu += "; identity not recorded (family, model and flags unknown)"
    commit = env.get("git_commit")
    commit_text = (commit[:12] if commit else None)
    if commit_text and env.get("git_dirty"):
        commit_text += " (uncommitted changes)"
    rows = [
        ("hardware tag", hardware_tag(env)),
        ("accelerators", dev_text),
        ("NVIDIA driver", env.get("nvidia_driver_version")),
        ("CPU", cpu),
        ("hosts", env.get("host_count")),
        ("Python", env.get("python_version")),
        ("PyTorch", env.get("torch_version")),
        ("CUDA / cuDNN / NCCL", _versions(env, "cuda_version", "cudnn_version",
                                          "nccl_version")),
        ("DALI / DeepSpeed", _versions(env, "dali_version", "deepspeed_version")),
        ("git commit", commit_text),
        ("captured", " on ".join(str(env[k]) for k in ("timestamp_utc", "hostname")
                                 if env.get(k)) or None),
    ]
    out = ["## Hardware and software", "", markdown_table(["", ""], rows)]
    cmd = env.get("command_line")
    if cmd:
        out += ["Command line:", "", "```", str(cmd), "```", ""]
    return out


def _best_value(b: analysis.Best) -> str:
    r = b.row
    if b.column == "throughput_img_s":
        ci = _ci(r)
        return f"{fmt(r['throughput_img_s'], '.1f')} img/s" + (
            f" (95 % CI {ci})" if ci else "")
    if b.column == "scaling_efficiency":
        return (f"{_f(r['scaling_efficiency'], '.0f', ' %', scale=100)} (speedup "
                f"{fmt(r['speedup'], '.2f')}× on {fmt(r['world_size'], 'g')} workers)")
    if b.column == "common_efficiency":
        return (f"{_f(r['common_efficiency'], '.0f', ' %', scale=100)} (speedup "
                f"{fmt(r['common_speedup'], '.2f')}× on {fmt(r['world_size'], 'g')} workers "
                f"over the 1-worker {_text(r.get('common_baseline'))} run)")
    if b.column == "memory_mb":
        src = _text(r.get("memory_source"))
        return f"{fmt(r['memory_mb'], '.0f')} MiB per worker" + (
            f" ({_MEM_SOURCE_TEXT.get(src, src)})" if src else "")
    if b.column == "mIoU":
        return f"mIoU {fmt(r['mIoU'], '.3f')}" + (
            f" (mDice {fmt(r['mDice'], '.3f')})" if not missing(r.get("mDice")) else "")
    return f"{fmt(r[b.column], '.3g')} s" + (
        f" to mIoU ≥ {fmt(r['target_miou'], 'g')}" if not missing(r.get("target_miou"))
        else "")


def _best_section(d: pd.DataFrame) -> list[str]:
    ok = d[d["ok"]]
    rows = []
    excluded = 0
    for b in analysis.best_per_objective(d):
        excluded = max(excluded, b.excluded)
        if b.row is None:
            rows.append((b.objective, f"n/a: {b.note}", None, None))
            continue
        r = b.row
        run = _text(r.get("run_id"))
        if r.get("n_repeats", 1) > 1:
            run = f"{run} (median of {r['n_repeats']} repeats)"
        value = _best_value(b)
        if b.ties:  # no winner: the value, then who it is tied with
            value += (f" (tied within {b.noise_pct:.1f} %"
                      + (", spread assumed" if not b.spread_measured else "")
                      + f", with {len(b.ties)} other(s): {', '.join(b.ties)}; lead "
                      f"{b.lead_pct:.1f} %)")
        elif b.lead_pct == b.lead_pct:
            value += f" (lead {b.lead_pct:.1f} % over the noise of {b.noise_pct:.1f} %)"
        rows.append((b.objective, value, _describe(pd.DataFrame([r]), ok)[0], run))
    bests = [b for b in analysis.best_per_objective(d) if b.row is not None]
    text = ("Repeats of a configuration count as their median. A best is named only when "
            "its lead exceeds the noise: the two runs' 95 % CIs combined (throughput, "
            "efficiency) plus the larger spread of their repeats; otherwise the objective "
            "is a tie, with the runs within it.")
    if any(not b.spread_measured for b in bests if b.lead_pct == b.lead_pct):
        text += (f" Without repeats the run-to-run spread is unknown: "
                 f"{analysis.RUN_TO_RUN_PCT:g} % is assumed (measured between identical runs "
                 "on one host); run with --repeats 3 to measure it.")
    if excluded:
        text += (" Low-confidence configurations are never picked (see Low-confidence "
                 "figures and the caveats beside the tables below).")
    return ["## Best configuration per objective", "", text, "",
            markdown_table(["objective", "best", "configuration", "run"], rows)]


def _config_value(c: str, row: pd.Series) -> Any:
    if c == "lr" and norm(row.get("base_lr")) is not None:
        return norm(row.get("base_lr"))  # an lr scaling rule varies lr with the workers
    return norm(row.get(c))


def _config_columns(d: pd.DataFrame) -> list[str]:
    """The configuration columns worth a table column: those that vary."""
    cols = []
    strong = any(truthy(v) for v in d["strong_scaling"])
    for c in _TABLE_CONFIG:
        if c not in d or (c == "global_batch_size" and not strong):
            continue  # the global batch follows from workers x batch under weak scaling
        values = {_config_value(c, r) for _, r in d.iterrows()} - {None}
        if c == "engine" and "zero_stage" in d:
            values = {(norm(e), norm(z))
                      for e, z in zip(d["engine"], d["zero_stage"])} - {(None, None)}
        if len(values) > 1:
            cols.append(c)
    if "widths" in cols and "depth" in cols:
        pairs = {(norm(a), norm(b)) for a, b in zip(d["widths"], d["depth"])}
        pairs = {p for p in pairs if None not in p}  # failed rows may lack either
        if len(pairs) == len({p[1] for p in pairs}):
            cols.remove("widths")  # widths follow from depth in this sweep
    return cols or [c for c in ("world_size", "batch_size") if c in d]


def _config_cell(c: str, row: pd.Series) -> str | None:
    if c == "engine":
        e, z = norm(row.get("engine")), norm(row.get("zero_stage"))
        if e is None:
            return None
        return f"deepspeed ZeRO-{z}" if e == "deepspeed" and z is not None else str(e)
    return _text(_config_value(c, row))


def _sorted_rows(d: pd.DataFrame) -> pd.DataFrame:
    if not len(d):
        return d
    keys = analysis.family_keys(d, [*analysis.family_columns(d), "world_size", "repeat"])
    order = sorted(range(len(d)), key=lambda i: sort_key(keys[i]))
    return d.iloc[order]


class _Table:
    """Columns shown only when some row has them: (header, align, cell function)."""

    def __init__(self) -> None:
        self.cols: list[tuple[str, str, Any]] = []

    def add(self, header: str, cell, align: str = "r", when: bool = True) -> None:
        if when:
            self.cols.append((header, align, cell))

    def render(self, rows: pd.DataFrame) -> str:
        return markdown_table([h for h, _, _ in self.cols],
                              [[cell(r) for _, _, cell in self.cols]
                               for _, r in rows.iterrows()],
                              [a for _, a, _ in self.cols])


def _config_table(d: pd.DataFrame) -> _Table:
    t = _Table()
    for c in _config_columns(d):
        t.add(c, lambda r, c=c: _config_cell(c, r), "l")
    t.add("repeat", lambda r: _f(r["repeat"], "g"),
          when=bool(d["repeat"].notna().any() and d["repeat"].nunique() > 1))
    return t


def _results_section(d: pd.DataFrame, env: dict[str, Any]) -> list[str]:
    t = _config_table(d)
    t.add("status", lambda r: _text(r.get("status")), "l")
    t.add("img/s", lambda r: _f(r["throughput_img_s"], ".1f"))
    t.add("95 % CI", _ci, when=bool(d["throughput_ci95_lo"].notna().any()))
    wall = bool(d["wall_throughput_img_s"].notna().any())
    t.add("wall img/s", lambda r: _f(r["wall_throughput_img_s"], ".1f"), when=wall)
    t.add("measured share", lambda r: _f(r["measured_time_share"], ".0f", " %", scale=100),
          when=wall)
    energy = bool(d["energy_j_per_img"].notna().any())
    t.add("J/img", lambda r: _f(r["energy_j_per_img"], ".3g"), when=energy)
    t.add("p50 ms", lambda r: _f(r["step_ms_p50"], ".1f"))
    t.add("p99 ms", lambda r: _f(r["step_ms_p99"], ".1f"))
    t.add("data wait %", lambda r: _f(r["data_wait_pct"], ".1f"))
    t.add("speedup", lambda r: _f(r["speedup"], ".2f", "×"))
    t.add("hw ceiling", lambda r: _f(r["hw_ceiling_speedup"], "g", "×"),
          when=bool(d["hw_ceiling_speedup"].notna().any()))
    t.add("efficiency", lambda r: _f(r["scaling_efficiency"], ".0f", " %", scale=100))
    common = d[d["ok"]][["engine", "zero_stage", "loader"]].astype(str).drop_duplicates()
    t.add("vs common", lambda r: _f(r["common_speedup"], ".2f", "×"),
          when=len(common) > 1 and bool(d["common_speedup"].notna().any()))
    t.add("memory MiB", lambda r: _f(r["memory_mb"], ".0f"))
    t.add("launch s", lambda r: _f(r["launch_overhead_s"], ".1f"),
          when=bool(np.isfinite(d["launch_overhead_s"]).any()))
    t.add("flags", _flags, "l")
    t.add("run", lambda r: _text(r.get("run_id")), "l")
    mem = sorted({_MEM_SOURCE_TEXT.get(s, s) for s in d["memory_source"].dropna()})
    notes = list(dict.fromkeys(cav.caveats(d, env, "speed")
                               + cav.caveats(d, env, "memory")))
    return ["## Results", "",
            "One row per run. img/s: images per second over all workers, with its 95 % "
            "confidence interval where recorded (the steady state: the measured steps "
            "only); wall img/s: the same images over the wall time of their whole window "
            "(epoch boundaries, loader restarts, checkpoints included), and measured share: "
            "the steps' part of that time (below "
            f"{analysis.WALL_SHARE_MIN * 100:.0f} %: flagged wall-gap); p50/p99: step time; data wait: share of "
            "step time spent waiting for input; speedup: throughput over the 1-worker run "
            "of the same configuration (median of its repeats); hw ceiling: the most "
            "speedup the hardware allows; efficiency: speedup / workers; vs common (where "
            "engines or loaders differ): throughput over one common 1-worker baseline "
            f"({' or '.join(analysis.REFERENCE_ENGINES)} with the "
            f"{analysis.REFERENCE_LOADERS[0]} loader where run), so engines and loaders "
            "compare on one scale; memory MiB: the peak per worker over the run's phases "
            "(warm-up, training, validation), max over ranks ("
            + (", ".join(mem) or "not recorded") + "); "
            "launch s: launch to first step (see Launch overhead); flags: see "
            "Low-confidence figures."
            + (" J/img: energy per image over the timed window (NVML on a GPU; on a CPU "
               "the RAPL package counter, which covers the whole socket, other processes "
               "too)." if energy else ""), "",
            *_caveat_lines(notes), t.render(_sorted_rows(d))]


def _accuracy_section(d: pd.DataFrame, env: dict[str, Any]) -> list[str]:
    acc = d[d["ok"] & (d["mIoU"].notna() | d["flags"].str.contains("not-converged"))]
    if not len(acc):
        return []
    budget, source = cav.sample_budget(acc)
    target = sorted({norm(v) for v in acc["target_miou"]} - {None})
    t = _config_table(acc)
    t.add("samples", lambda r: _f(budget[r.name], ".0f"))
    t.add("steps", lambda r: _f(r["steps"], ".0f"))
    t.add("lr", lambda r: _f(r["lr"], "g"))
    t.add("mIoU", lambda r: _f(r["mIoU"], ".3f"))
    t.add("mDice", lambda r: _f(r["mDice"], ".3f"))
    t.add("val loss", lambda r: _f(r["val_loss"], ".3f"))
    t.add("val images", lambda r: _f(r["val_images"], ".0f"))
    t.add("train s", lambda r: _f(r["train_time_s"], ".1f"))
    t.add("time to target s", lambda r: _f(r["time_to_target_s"], ".1f"))
    t.add("quality speedup", lambda r: _f(r["time_to_target_speedup"], ".2f", "×"),
          when=bool(acc["time_to_target_s"].notna().any()))
    t.add("flags", _flags, "l")
    t.add("run", lambda r: _text(r.get("run_id")), "l")
    return ["## Accuracy", "",
            "Validation accuracy of each run that trained for it. samples: training "
            f"samples ({source}); time to target: training time until validation mIoU "
            "first reached " + (f"the target ({', '.join(map(str, target))})" if target
                                else "the target") + "; quality speedup: the 1-worker "
            "run's time to target over this run's (MLPerf's quality-aware speedup: time "
            "to the same accuracy, not to the same step count).", "",
            f"**{cav.accuracy_budget(acc)}**", "",
            f"**Data: {plots.accuracy_basis([(None, acc)])}.**"
            + (" Synthetic scenes test the code path: these accuracies are not findings "
               "about drone photos." if (acc["data_source"] == "synthetic").any() else ""),
            "", *_caveat_lines(cav.caveats(acc, env, "accuracy")),
            t.render(_sorted_rows(acc))]


def _confidence_section(d: pd.DataFrame) -> list[str]:
    out = ["## Low-confidence figures", ""]
    ok = d[d["ok"]]
    flagged = ok[ok["low_confidence"]]
    if not len(ok):
        return out + ["No ok runs.", ""]
    if not len(flagged):
        return out + [f"None: every ok run has at least {analysis.MIN_MEASURED_STEPS} "
                      f"measured steps, a 95 % CI and repeat spread within "
                      f"±{analysis.CI_LIMIT_PCT:g} % where recorded, no oversubscription, "
                      "native precision, and converged where it trained for accuracy.", ""]
    found = {f.strip() for text in flagged["flags"] for f in text.split(",")}
    out += [f"⚠ {len(flagged)} of {len(ok)} ok run(s) flagged. They are drawn hollow and "
            "never picked as best or placed on the Pareto front.", ""]
    out += [f"- `{k}`: {v}" for k, v in analysis.FLAGS.items() if k in found]
    out += [""]
    rows = _sorted_rows(flagged)
    desc = dict(zip(rows.index, _describe(rows, ok)))
    t = _Table()
    t.add("run", lambda r: _text(r.get("run_id")), "l")
    t.add("configuration", lambda r: desc[r.name], "l")
    t.add("flags", lambda r: r["flags"], "l")
    t.add("measured steps", lambda r: _f(r["measured_steps"], ".0f"))
    t.add("CI ± %", lambda r: _f(r["throughput_ci95_pct"], ".1f", " %"),
          when=bool(rows["throughput_ci95_pct"].notna().any()))
    t.add("repeat spread", lambda r: _f(r["throughput_spread_pct"], ".1f", " %"),
          when=bool(rows["throughput_spread_pct"].notna().any()))
    t.add("mIoU", lambda r: _f(r["mIoU"], ".3f"), when=bool(rows["mIoU"].notna().any()))
    return out + [t.render(rows)]


def _failed_section(d: pd.DataFrame, folder: Path) -> list[str]:
    status = d["status"].map(norm)
    bad = d[status.isin(_FAILED)]
    skipped = d[status == "skipped"]
    other = d[~status.isin((*_FAILED, "skipped", "ok"))]
    out = ["## Failed, out-of-memory and timed-out runs", ""]
    if not len(bad) and not len(other):
        out += ["None: every run that was started finished.", ""]
    problem = pd.concat([bad, other])
    if len(problem):
        desc = _describe(problem, d)
        rows = []
        for (_, r), text in zip(problem.iterrows(), desc):
            rid = _text(r.get("run_id"))
            log = folder / "logs" / f"{rid}.log"
            rows.append([rid, _text(r.get("status")) or "unknown", text,
                         _first_line(r.get("error")) or "(no error text)",
                         f"[log](logs/{rid}.log)" if rid and log.is_file() else None])
        out += [markdown_table(["run", "status", "configuration", "error", "log"], rows)]
    if len(skipped):
        out += ["Skipped:", ""]
        out += [f"- `{_text(r.get('run_id'))}`: {_first_line(r.get('error')) or 'skipped'}"
                for _, r in skipped.iterrows()]
        out += [""]
    return out


def _launch_section(d: pd.DataFrame) -> list[str]:
    out = ["## Launch overhead", "",
           "Seconds from the sweep launching a job to that job's first training step "
           "(process start, imports, rendezvous, data and model set-up); per run in the "
           "results table (launch s).", ""]
    sel = d[np.isfinite(d["launch_overhead_s"])]
    if not len(sel):
        return out + ["Not recorded.", ""]
    values = sel["launch_overhead_s"]
    slowest = sel.loc[values.idxmax()]
    out += [f"Median **{values.median():.1f} s** over {len(sel)} run(s) (min "
            f"{values.min():.1f} s, max {values.max():.1f} s: "
            f"`{_text(slowest.get('run_id'))}`).", ""]
    per_ws = sel.groupby("world_size")["launch_overhead_s"].agg(["median", "min", "max",
                                                                  "count"])
    if len(per_ws) > 1:
        rows = [[f"{w:g}", f"{r['median']:.1f}", f"{r['min']:.1f}", f"{r['max']:.1f}",
                 f"{r['count']:.0f}"] for w, r in per_ws.iterrows()]
        out += [markdown_table(["workers", "median s", "min s", "max s", "runs"], rows,
                               ["r"] * 5)]
    return out


def _plots_section(results: dict[str, plots.PlotResult], base: Path) -> list[str]:
    out = ["## Plots", ""]
    for name in plots.PLOT_NAMES:
        res = results.get(name)
        title = plots.PLOT_TITLES[name]
        out.append(f"### {title}")
        out.append("")
        if res is None:
            out += ["*not drawn*", ""]
            continue
        try:
            rel = res.path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            rel = res.path.as_posix()
        if res.note:
            out += [f"*not enough data: {res.note}* ([placeholder]({rel}))", ""]
        else:
            out += [f"![{title}]({rel})", ""]
    return out


def _status_summary(d: pd.DataFrame) -> str:
    counts: dict[str, int] = {}
    for s in d["status"]:
        s = norm(s) or "unknown"
        counts[s] = counts.get(s, 0) + 1
    order = ["ok", *_FAILED, "skipped"]
    parts = [f"{counts.pop(s)} {s}" for s in order if s in counts]
    parts += [f"{n} {s}" for s, n in sorted(counts.items())]
    return f"{len(d)} run(s): " + (", ".join(parts) if parts else "none recorded")


# --------------------------------------------------------------------------- entry points


def _scaling_section(folder: Path, out: Path, what_if_step_ms: float | None = None
                     ) -> list[str]:
    """The calibrated scaling and memory models (segcore.scaling.report)."""
    from segcore.scaling.report import report_section
    from segcore.results.rows import read_records

    try:
        text = report_section(read_records(folder), folder / "commbench.json",
                              out / "plots", link_base=out, what_if_step_ms=what_if_step_ms)
    except Exception as e:  # a model that cannot be fitted must not lose the report
        return ["## Scaling model", "", f"Not drawn ({type(e).__name__}: "
                f"{_first_line(e)}).", ""]
    return text.rstrip().splitlines() + [""]


def write_report(folder: str | Path, plot_results: dict[str, plots.PlotResult] | None
                 = None, out: str | Path | None = None,
                 what_if_step_ms: float | None = None) -> Path:
    """Write ``report.md`` for a results folder.

    Args:
        folder: the results folder (``runs.jsonl``, ``env.json``).
        plot_results: the figures already drawn (from :func:`segcore.plots.plot_all`);
            when None they are drawn now into ``<out>/plots``, so the report never
            links a figure older than its table.
        out: where ``report.md`` (and drawn plots) go; default ``folder``.
        what_if_step_ms: a 1-worker step time (ms, e.g. a GPU's) the scaling model's
            what-if rows are also computed at.

    Returns:
        the path of ``report.md``.
    """
    folder = Path(folder)
    out = Path(out) if out is not None else folder
    df = read_rows(folder)
    env = read_env(folder)
    d = analysis.frame(df)
    if plot_results is None:
        plot_results = plots.plot_all(d, out / "plots",
                                      describe_context(df, env, folder.resolve().name))
    ids = sorted({str(v) for v in (norm(x) for x in d["sweep_id"]) if v is not None})
    sweep = ", ".join(ids) or env.get("sweep_id") or "not recorded"
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# Benchmark report: {folder.resolve().name}", "",
             f"{_status_summary(d)}. Sweep id {sweep}; report written {now} from "
             f"runs.jsonl (redraw: `python launch/plot.py {folder.as_posix()}`).", ""]
    if cav.is_cpu(d, env):
        lines += ["> **⚠ CPU run: CPU timings show code paths and relative effects, not "
                  "GPU performance.** Each worker is a CPU process (gloo backend) sharing "
                  "the host's cores; throughput, speedup and memory here say which code "
                  "paths work and how configurations compare on this host, not what a "
                  "GPU would do.", ""]
    lines += _env_section(env)
    if not len(d):
        lines += ["## Results", "", "No runs recorded in runs.jsonl.", ""]
    else:
        lines += _best_section(d)
        lines += _results_section(d, env)
        lines += _accuracy_section(d, env)
        lines += study_section(d, env)
        lines += _scaling_section(folder, out, what_if_step_ms)
        lines += _confidence_section(d)
        lines += _failed_section(d, folder)
        lines += _launch_section(d)
    lines += _plots_section(plot_results, out)
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path


def write_compare(folders: Sequence[str | Path], out: str | Path) -> Path:
    """Comparison figures of several results folders and ``compare.md`` listing them.

    Args:
        folders: results folders (two machines, two commits, ...).
        out: the output folder (created if missing).

    Returns:
        the path of ``compare.md``.
    """
    folders = [Path(f) for f in folders]
    out = Path(out)
    labels = folder_labels(folders)
    results = plots.plot_compare(folders, out, labels)
    rows = []
    for lab, f in zip(labels, folders):
        env = read_env(f)
        d = analysis.frame(read_rows(f))
        # The best figure we can stand behind, as in each folder's report.
        best = analysis.best_per_objective(d)[0].row
        rows.append([lab, f.as_posix(), hardware_tag(env) if env else None,
                     (env.get("git_commit") or "")[:12] or None,
                     _status_summary(d) if len(d) else "no runs",
                     None if best is None else _f(best["throughput_img_s"], ".1f")])
    lines = [f"# Comparison of {len(folders)} results folders", "",
             markdown_table(["label", "folder", "hardware", "git commit", "runs",
                             "best img/s"], rows, ["l", "l", "l", "l", "l", "r"])]
    if any(cav.is_cpu(None, read_env(f)) for f in folders):
        lines += ["> **⚠ At least one folder is a CPU run: CPU timings show code paths "
                  "and relative effects, not GPU performance.**", ""]
    lines += _plots_section(results, out)
    path = out / "compare.md"
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path

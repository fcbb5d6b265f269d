"""``report.md`` of a results folder: environment, best configurations, tables, plots.

The report is re-derived from ``runs.jsonl`` and ``env.json`` whenever it is written
(speedup included, see :func:`segcore.plots.compute_speedup`), so it can be redrawn
from any results folder with ``python launch/plot.py RESULTS_DIR``. Tables are written
by a small formatter of our own: pandas' ``to_markdown`` needs ``tabulate``, which is
not a dependency.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from segcore.sweep import plots
from segcore.host import hardware_tag
from segcore.sweep.rows import read_rows
from segcore.io import write_text_atomic

__all__ = ["NOISE_LIMIT_PCT", "markdown_table", "write_report", "write_compare",
           "noisy_mask", "best_configurations"]

NOISE_LIMIT_PCT = 10.0  # throughput spread over repeats above which a result is noisy
_FAILED = ("oom", "failed", "timeout")
_DASH = "–"
# Configuration columns the results table may show (those that vary, see
# _config_columns); engine and ZeRO stage are shown as one column.
_TABLE_CONFIG = ("engine", "loader", "precision", "channels_last", "compile", "batch_size",
                 "global_batch_size", "arch", "widths", "depth", "image_size",
                 "class_scheme", "mode", "strong_scaling", *plots.OPTIONAL_FAMILY_COLUMNS,
                 "world_size", "nnodes")
_MEM_SOURCE_TEXT = {"allocator": "allocator peak", "host_peak_rss": "host peak RSS"}


# --------------------------------------------------------------------------- formatting


def _cell(v: Any) -> str:
    text = _DASH if v is None else str(v)
    # A pipe would end the cell and a newline the row.
    return text.replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table.

    Args:
        headers: column titles.
        rows: cells (any values; ``None`` is written as a dash; pipes and newlines are
            escaped).
        align: per column ``"l"`` or ``"r"``; default left.

    Returns:
        the table, one line per row, ending with a newline.
    """
    align = list(align) if align is not None else ["l"] * len(headers)
    head = [_cell(h) for h in headers]
    body = [[_cell(v) for v in r] for r in rows]
    widths = [max([len(head[i])] + [len(r[i]) for r in body] + [3])
              for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w)
                                 for c, w, a in zip(cells, widths, align)) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if a == "r" else "-" * w
                             for w, a in zip(widths, align)) + " |"
    return "\n".join([line(head), rule] + [line(r) for r in body]) + "\n"


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def _f(v: Any, fmt: str, suffix: str = "") -> str | None:
    f = _num(v)
    return None if not math.isfinite(f) else format(f, fmt) + suffix


def _text(v: Any) -> str | None:
    n = plots._norm(v)
    if n is None:
        return None
    if isinstance(n, bool):
        return "yes" if n else "no"
    return str(n)


def _first_line(text: Any, limit: int = 300) -> str:
    s = " ⏎ ".join(line.strip() for line in str(text or "").strip().splitlines()
                   if line.strip())
    return s if len(s) <= limit else s[:limit - 1] + "…"


# --------------------------------------------------------------------------- analysis


def noisy_mask(df: pd.DataFrame, limit_pct: float = NOISE_LIMIT_PCT) -> pd.Series:
    """Rows whose measurement is noisy: ``noisy`` true, or ``throughput_spread_pct``
    (spread of throughput over repeats, % of the median) above ``limit_pct``.

    Args:
        df: rows as in runs.csv.
        limit_pct: the spread above which a row is noisy.

    Returns:
        a boolean Series aligned with ``df``.
    """
    flag = df["noisy"].map(plots._truthy) if "noisy" in df else pd.Series(False, df.index)
    spread = pd.to_numeric(df["throughput_spread_pct"], errors="coerce") \
        if "throughput_spread_pct" in df else pd.Series(np.nan, df.index)
    return (flag.astype(bool) | (spread > limit_pct)).astype(bool)


_MEDIAN_COLS = ("throughput_img_s", "step_ms_p50", "step_ms_p99", "data_wait_pct",
                "speedup", "scaling_efficiency", "peak_mem_mb", "mIoU", "mDice",
                "train_time_s", "time_to_target_s", "target_miou")


def _configurations(ok: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (family + worker count): the median of each metric
    over its repeats, the first repeat's other values, and ``n_repeats``."""
    if not len(ok):
        return ok.assign(n_repeats=pd.Series(dtype=int))
    cols = plots._family_columns(ok) + ["world_size"]
    keys = plots.family_keys(ok, cols)
    groups: dict[tuple, list[int]] = {}
    for pos, k in enumerate(keys):
        groups.setdefault(k, []).append(pos)
    rows = []
    for pos in groups.values():
        g = ok.iloc[pos]
        row = g.iloc[0].to_dict()
        for c in _MEDIAN_COLS:
            if c in g:
                vals = pd.to_numeric(g[c], errors="coerce").dropna()
                row[c] = float(vals.median()) if len(vals) else math.nan
        row["n_repeats"] = len(pos)
        rows.append(row)
    return pd.DataFrame(rows)


def _describe(rows: pd.DataFrame, reference: pd.DataFrame) -> list[str]:
    """Descriptions of ``rows`` naming what varies across ``reference`` (the sweep),
    always with workers, batch and depth."""
    both = pd.concat([reference, rows], ignore_index=True)
    text = plots.describe_rows(both, always=("world_size", "batch_size", "depth"))
    return text[len(reference):]


def _mem_source(row: pd.Series) -> str:
    src = _text(row.get("peak_mem_source"))
    return f" ({_MEM_SOURCE_TEXT.get(src, src)})" if src else ""


def best_configurations(df: pd.DataFrame) -> list[dict[str, Any]]:
    """The best configuration per objective, repeats reduced to their median.

    Args:
        df: rows as in runs.csv, speedup filled (:func:`segcore.plots.compute_speedup`).

    Returns:
        one dict per objective, in report order: ``objective``, ``value`` (text),
        ``row`` (the configuration's row, or None when no row has the metric) and
        ``note`` (why not, when None).
    """
    d = plots._clean(df)
    d["speedup"], d["scaling_efficiency"] = plots._speedup_columns(d)
    conf = _configurations(d[d["_ok"]])
    out: list[dict[str, Any]] = []

    def pick(objective: str, col: str, highest: bool, value: Callable[[pd.Series], str],
             missing: str, subset: pd.DataFrame | None = None) -> None:
        pool = conf if subset is None else subset
        vals = pd.to_numeric(pool[col], errors="coerce") if len(pool) and col in pool \
            else pd.Series(dtype=float)
        if not vals.notna().any():
            out.append({"objective": objective, "value": None, "row": None,
                        "note": missing})
            return
        i = vals.idxmax() if highest else vals.idxmin()
        row = pool.loc[i]
        out.append({"objective": objective, "value": value(row), "row": row, "note": None})

    pick("Highest throughput", "throughput_img_s", True,
         lambda r: f"{r['throughput_img_s']:.1f} img/s", "no ok run measured throughput")
    eff = conf[pd.to_numeric(conf["scaling_efficiency"], errors="coerce").notna()] \
        if len(conf) else conf
    top = eff["world_size"].max() if len(eff) else math.nan
    pick("Best scaling efficiency at the largest worker count"
         + (f" ({top:g})" if math.isfinite(_num(top)) else ""),
         "scaling_efficiency", True,
         lambda r: f"{100 * r['scaling_efficiency']:.0f} % (speedup {r['speedup']:.2f}× on "
                   f"{r['world_size']:g} workers)",
         "no configuration has both a 1-worker run and a multi-worker run",
         subset=eff[eff["world_size"] == top] if len(eff) else eff)
    pick("Lowest peak memory", "peak_mem_mb", False,
         lambda r: f"{r['peak_mem_mb']:.0f} MB per worker" + _mem_source(r),
         "no ok run recorded peak memory")
    pick("Best mIoU", "mIoU", True,
         lambda r: f"mIoU {r['mIoU']:.3f}"
                   + (f" (mDice {r['mDice']:.3f})" if math.isfinite(_num(r.get("mDice")))
                      else ""),
         "no ok run measured accuracy (throughput-only sweep?)")
    pick("Fastest time to target mIoU", "time_to_target_s", False,
         lambda r: f"{r['time_to_target_s']:.0f} s"
                   + (f" to mIoU ≥ {r['target_miou']:g}"
                      if math.isfinite(_num(r.get("target_miou"))) else ""),
         "no run reached its target mIoU")
    return out


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
            mem = _num(dev.get("memory_mb"))
            name = f"{dev.get('name') or 'GPU'}" + (f" ({mem / 1024:.0f} GB)"
                                                     if math.isfinite(mem) else "")
            names[name] = names.get(name, 0) + 1
        dev_text = ", ".join(f"{n} × {name}" for name, n in names.items())
    else:
        dev_text = "none: CPU only (each worker is a CPU process, gloo backend)"
    cores = env.get("cpu_count")
    usable = env.get("cpu_affinity_count")
    cpu = f"{env.get('cpu_model') or 'unknown'}, {cores or '?'} cores" + (
        f" ({usable} usable)" if usable and usable != cores else "")
    mem = _num(env.get("mem_total_mb"))
    if math.isfinite(mem):
        cpu += f", {mem / 1024:.0f} GB RAM"
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


def _best_section(df: pd.DataFrame) -> list[str]:
    best = best_configurations(df)
    d = plots._clean(df)
    ok = d[d["_ok"]]
    rows = []
    for b in best:
        if b["row"] is None:
            rows.append((b["objective"], f"n/a: {b['note']}", None, None))
            continue
        r = b["row"]
        desc = _describe(pd.DataFrame([r]), ok)[0]
        run = _text(r.get("run_id"))
        if r.get("n_repeats", 1) > 1:
            run = f"{run} (median of {r['n_repeats']} repeats)"
        rows.append((b["objective"], b["value"], desc, run))
    return ["## Best configuration per objective", "",
            "Repeats of a configuration count as their median.", "",
            markdown_table(["objective", "best", "configuration", "run"], rows)]


def _config_columns(d: pd.DataFrame) -> list[str]:
    """The configuration columns worth a table column: those that vary."""
    cols = []
    for c in _TABLE_CONFIG:
        if c not in d:
            continue
        strong = any(plots._truthy(v) for v in d["strong_scaling"])
        if c == "global_batch_size" and not strong:
            continue  # follows from workers x batch under weak scaling
        values = {plots._norm(v) for v in d[c]} - {None}
        if c == "engine" and "zero_stage" in d:
            values = {(plots._norm(e), plots._norm(z))
                      for e, z in zip(d["engine"], d["zero_stage"])} - {(None, None)}
        if len(values) > 1:
            cols.append(c)
    if "widths" in cols and "depth" in cols:
        pairs = {(plots._norm(a), plots._norm(b)) for a, b in zip(d["widths"], d["depth"])}
        pairs = {p for p in pairs if None not in p}  # failed rows may lack either
        if len(pairs) == len({p[1] for p in pairs}):
            cols.remove("widths")  # widths follow from depth in this sweep
    return cols or [c for c in ("world_size", "batch_size") if c in d]


def _config_cell(c: str, row: pd.Series) -> str | None:
    if c == "engine":
        e, z = plots._norm(row.get("engine")), plots._norm(row.get("zero_stage"))
        if e is None:
            return None
        return f"deepspeed ZeRO-{z}" if e == "deepspeed" and z is not None else str(e)
    return _text(row.get(c))


def _sorted_rows(d: pd.DataFrame) -> pd.DataFrame:
    if not len(d):
        return d
    cols = plots._family_columns(d) + ["world_size", "repeat"]
    keys = plots.family_keys(d, cols)
    order = sorted(range(len(d)), key=lambda i: plots._sort_key(keys[i]))
    return d.iloc[order]


def _results_section(d: pd.DataFrame, noisy: pd.Series) -> list[str]:
    cfg = _config_columns(d)
    has_repeats = d["repeat"].notna().any() and d["repeat"].nunique() > 1
    has_launch = bool(np.isfinite(d["launch_overhead_s"]).any())
    headers = [*cfg, *(["repeat"] if has_repeats else []), "status", "img/s", "p50 ms",
               "p99 ms", "data wait %", "speedup", "efficiency", "peak MB", "mIoU",
               *(["launch s"] if has_launch else []), "flags", "run"]
    align = ["l"] * len(cfg) + (["r"] if has_repeats else []) + \
        ["l", "r", "r", "r", "r", "r", "r", "r", "r"] + (["r"] if has_launch else []) + \
        ["l", "l"]
    rows = []
    for i, r in _sorted_rows(d).iterrows():
        flags = []
        if noisy.loc[i]:
            spread = _f(r.get("throughput_spread_pct"), ".0f", " %")
            flags.append("⚠ noisy" + (f" (spread {spread})" if spread else ""))
        rows.append([*(_config_cell(c, r) for c in cfg),
                     *([_f(r["repeat"], "g")] if has_repeats else []),
                     _text(r.get("status")), _f(r["throughput_img_s"], ".1f"),
                     _f(r["step_ms_p50"], ".1f"), _f(r["step_ms_p99"], ".1f"),
                     _f(r["data_wait_pct"], ".1f"), _f(r["speedup"], ".2f", "×"),
                     _f(_num(r["scaling_efficiency"]) * 100, ".0f", " %"),
                     _f(r["peak_mem_mb"], ".0f"), _f(r["mIoU"], ".3f"),
                     *([_f(r["launch_overhead_s"], ".1f")] if has_launch else []),
                     ", ".join(flags) or "", _text(r.get("run_id"))])
    return ["## Results", "",
            "One row per run. img/s: images per second over all workers; p50/p99: step "
            "time; data wait: share of step time spent waiting for input; speedup: "
            "throughput over the 1-worker run of the same configuration (median of its "
            "repeats); efficiency: speedup / workers; peak MB: peak memory per worker "
            "(max over ranks); launch s: launch to first step (see Launch overhead).", "",
            markdown_table(headers, rows, align)]


def _failed_section(d: pd.DataFrame, folder: Path) -> list[str]:
    status = d["status"].map(plots._norm)
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


def _noise_section(d: pd.DataFrame, noisy: pd.Series) -> list[str]:
    out = ["## Noisy measurements", ""]
    flagged = d[noisy & d["_ok"]]
    spread = pd.to_numeric(d["throughput_spread_pct"], errors="coerce")
    if len(flagged):
        conf = _configurations(flagged)  # one line per configuration, not per repeat
        out += [f"⚠ {len(flagged)} run(s) of {len(conf)} configuration(s) flagged: "
                f"throughput varied by more than {NOISE_LIMIT_PCT:g} % of the median "
                "between repeats of the same configuration (or the sweep flagged them). "
                "Treat their differences from other runs with caution; re-run them on "
                "an idle machine.", ""]
        desc = _describe(conf, d)
        rows = [[text, f"{r['n_repeats']}", _f(r["throughput_img_s"], ".1f"),
                 _f(r.get("throughput_spread_pct"), ".1f", " %"), _text(r.get("run_id"))]
                for (_, r), text in zip(conf.iterrows(), desc)]
        out += [markdown_table(["configuration", "runs", "median img/s", "spread",
                                "first run"], rows, ["l", "r", "r", "r", "l"])]
    elif spread.notna().any():
        out += [f"None: the throughput spread over repeats stayed within "
                f"{NOISE_LIMIT_PCT:g} % (largest {spread.max():.1f} %).", ""]
    else:
        out += ["Not measured: each configuration ran once. Run the sweep with repeats "
                "to measure the spread.", ""]
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
        s = plots._norm(s) or "unknown"
        counts[s] = counts.get(s, 0) + 1
    order = ["ok", *_FAILED, "skipped"]
    parts = [f"{counts.pop(s)} {s}" for s in order if s in counts]
    parts += [f"{n} {s}" for s, n in sorted(counts.items())]
    return f"{len(d)} run(s): " + (", ".join(parts) if parts else "none recorded")


# --------------------------------------------------------------------------- entry points


def write_report(folder: str | Path, plot_results: dict[str, plots.PlotResult] | None
                 = None, out: str | Path | None = None) -> Path:
    """Write ``report.md`` for a results folder.

    Args:
        folder: the results folder (``runs.jsonl``, ``env.json``).
        plot_results: the figures already drawn (from :func:`segcore.plots.plot_all`);
            when None they are drawn now into ``<out>/plots``, so the report never
            links a figure older than its table.
        out: where ``report.md`` (and drawn plots) go; default ``folder``.

    Returns:
        the path of ``report.md``.
    """
    folder = Path(folder)
    out = Path(out) if out is not None else folder
    df = read_rows(folder)
    env = plots.read_env(folder)
    if plot_results is None:
        plot_results = plots.plot_all(df, out / "plots", plots.describe_context(df, env))
    d = plots._clean(df)
    d["speedup"], d["scaling_efficiency"] = plots._speedup_columns(d)
    noisy = noisy_mask(d)
    ids = sorted({str(v) for v in (plots._norm(x) for x in d["sweep_id"]) if v is not None})
    sweep = ", ".join(ids) or env.get("sweep_id") or folder.resolve().name
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# Benchmark report: {sweep}", "",
             f"{_status_summary(d)}. Results folder `{folder.resolve().name}`; report "
             f"written {now} from runs.jsonl (redraw: `python launch/plot.py "
             f"{folder.as_posix()}`).", ""]
    if plots._is_cpu(env, d):
        lines += ["> **⚠ CPU run: CPU timings show code paths and relative effects, not "
                  "GPU performance.** Each worker is a CPU process (gloo backend) sharing "
                  "the host's cores; throughput, speedup and memory here say which code "
                  "paths work and how configurations compare on this host, not what a "
                  "GPU would do.", ""]
    lines += _env_section(env)
    if not len(d):
        lines += ["## Results", "", "No runs recorded in runs.jsonl.", ""]
    else:
        lines += _best_section(df)
        lines += _results_section(d, noisy)
        lines += _failed_section(d, folder)
        lines += _noise_section(d, noisy)
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
    labels = plots.folder_labels(folders)
    results = plots.plot_compare(folders, out, labels)
    rows = []
    for lab, f in zip(labels, folders):
        env = plots.read_env(f)
        d = plots._clean(read_rows(f))
        best = pd.to_numeric(d.loc[d["_ok"], "throughput_img_s"], errors="coerce").max() \
            if len(d) else math.nan
        rows.append([lab, f.as_posix(), hardware_tag(env) if env else None,
                     (env.get("git_commit") or "")[:12] or None,
                     _status_summary(d) if len(d) else "no runs",
                     _f(best, ".1f")])
    lines = [f"# Comparison of {len(folders)} results folders", "",
             markdown_table(["label", "folder", "hardware", "git commit", "runs",
                             "best img/s"], rows, ["l", "l", "l", "l", "l", "r"])]
    if any(plots._is_cpu(plots.read_env(f), None) for f in folders):
        lines += ["> **⚠ At least one folder is a CPU run: CPU timings show code paths "
                  "and relative effects, not GPU performance.**", ""]
    lines += _plots_section(results, out)
    path = out / "compare.md"
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path

"""What a reader must know before acting on a results folder's numbers: the conditions
(CPU host, oversubscription, emulated precision), the flags that bar figures, the accuracy
budget and lr rule; one sentence each, for the report to print beside the tables it
concerns. Reads the analysed frame (:mod:`segcore.results.analysis`); computes nothing
the analysis does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from segcore.results.analysis import (CI_LIMIT_PCT, MIN_MEASURED_STEPS, WALL_SHARE_MIN,
                                      analysed, norm, numeric_column, sort_key)

__all__ = ["caveats", "is_cpu", "read_env", "sample_budget", "accuracy_budget"]


def read_env(folder: str | Path) -> dict[str, Any]:
    """``folder/env.json`` as a dict; empty when missing or unreadable."""
    try:
        env = json.loads((Path(folder) / "env.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return env if isinstance(env, dict) else {}


def is_cpu(df: pd.DataFrame | None, env: dict[str, Any]) -> bool:
    """Whether the folder ran on CPU: env.json says so, or a row's device_type does."""
    if env.get("accelerator") == "cpu":
        return True
    if df is not None and "device_type" in df:
        return any(norm(v) == "cpu" for v in df["device_type"])
    return False


def sample_budget(df: pd.DataFrame) -> tuple[pd.Series, str]:
    """Training samples per run: ``samples_seen`` where recorded, else ``steps`` x
    ``global_batch_size`` (an estimate: the last partial batch is not counted).

    Returns:
        (a float Series aligned with ``df``, the source in words).
    """
    seen = numeric_column(df, "samples_seen")
    if seen.notna().any():
        return seen, "samples seen"
    est = numeric_column(df, "steps") * numeric_column(df, "global_batch_size")
    return est, "steps × global batch"


def _plural(n: float, word: str) -> str:
    return f"{n:g} {word}" + ("s" if n != 1 else "")


def _count(mask: pd.Series, what: str) -> str:
    return f"{_plural(int(mask.sum()), 'run')} {what}"


def _fmt_set(values: Iterable[Any]) -> str:
    vals = sorted({norm(v) for v in values} - {None}, key=sort_key)
    return ", ".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in vals)


def _span(values: pd.Series) -> str:
    v = values.dropna()
    if not len(v):
        return "?"
    lo, hi = v.min(), v.max()
    return f"{lo:.0f}" if lo == hi else f"{lo:.0f}–{hi:.0f}"


# Budgets within this share of each other count as equal: drop_last trims a partial
# batch per epoch, which differs with the global batch.
_BUDGET_TOLERANCE = 0.10


def _lr_rules(d: pd.DataFrame) -> set:
    return {norm(v) for v in d["lr_scaling"]} - {None}


def accuracy_budget(df: pd.DataFrame) -> str | None:
    """The training budget and lr rule of the ok runs with accuracy, in one sentence:
    samples, steps and lr per worker count, and the lr scaling rule (``lr_scaling``).

    Returns:
        e.g. ``"Budget (samples seen): 1 worker: 136 samples in 34 steps at lr 0.003;
        2 workers: 136 samples in 17 steps at lr 0.006. lr rule: linear."``; None when
        no ok run measured accuracy.
    """
    d = analysed(df)
    acc = d[d["ok"] & d["mIoU"].notna()]
    if not len(acc):
        return None
    budget, source = sample_budget(acc)
    parts = []
    for ws, g in acc.groupby("world_size"):
        steps = _span(g["steps"])
        parts.append(f"{_plural(ws, 'worker')}: {_span(budget[g.index])} samples in "
                     f"{steps} step{'' if steps == '1' else 's'} at lr "
                     f"{_fmt_set(g['lr']) or '?'}")
    rules = _lr_rules(acc)
    return (f"Budget ({source}): " + "; ".join(parts) + ". lr rule: "
            + (", ".join(sorted(rules)) if rules else "none recorded") + ".")


def _accuracy_caveats(d: pd.DataFrame) -> list[str]:
    acc = d[d["ok"] & d["mIoU"].notna()]
    if not len(acc):
        return []
    out = []
    nc = acc["flags"].str.contains("not-converged")
    if nc.any():
        out.append(f"{_count(nc, 'did not converge')} (no mIoU, training loss did not "
                   "fall, or mIoU ≤ 1 / classes, what a constant prediction can reach): "
                   "flagged, off the Pareto front, never best.")
    per_family = acc.groupby("family", sort=False)["world_size"].nunique()
    if not (per_family > 1).any():
        return out
    cross = acc[acc["family"].map(per_family) > 1]
    rules = _lr_rules(cross)
    if not rules or rules == {"none"}:
        out.append("Accuracy is compared across worker counts without an lr scaling "
                   "rule: at an equal sample budget, N workers take 1/N of the steps at "
                   "the same lr, so mIoU at more workers reflects fewer updates, not data "
                   "parallelism (Goyal et al. 2017 scale the lr linearly with the global "
                   "batch, with warm-up: --lr-scaling linear).")
    budget, _ = sample_budget(cross)
    spread = budget.groupby(cross["family"], sort=False).agg(
        lambda b: (b.max() - b.min()) / b.max() if b.notna().any() else 0.0)
    if (spread > _BUDGET_TOLERANCE).any():
        out.append("Accuracy is compared across worker counts at sample budgets that "
                   f"differ by more than {_BUDGET_TOLERANCE:.0%} within a configuration: "
                   "mIoU differences partly reflect the budget.")
    return out


# Flags about the speed figures: (pattern, what the runs did, what that means).
_FLAG_CAVEATS = (
    ("impossible-mfu", "recorded", "an MFU above 1 (impossible-mfu): the ceiling it divides "
     "by was not measured under the step's conditions, so runs.csv's `mfu`/`mfu_gemm` "
     "there are not values; their throughput stands."),
    ("wall-gap", "spent", f"less than {WALL_SHARE_MIN * 100:.0f} % of their training window "
     "in the measured steps (wall-gap): their wall-clock throughput (`wall img/s`) is the "
     "rate to plan with."),
    ("few-steps|wide-ci", "rest on too few samples", f"(< {MIN_MEASURED_STEPS} measured "
     f"steps, or a 95 % CI / repeat spread wider than ±{CI_LIMIT_PCT:g} %): drawn hollow, "
     "listed under Low-confidence figures, never picked as best."),
)


def caveats(df: pd.DataFrame, env: dict[str, Any], about: str | None = None) -> list[str]:
    """Each caveat that applies to the rows shown, one sentence or two each.

    Args:
        df: the rows shown (or their analysed frame).
        env: env.json contents (may be empty).
        about: ``"speed"``, ``"memory"`` or ``"accuracy"`` for the caveats that concern
            that table; None for all of them.

    Returns:
        caveat texts, most general first; empty when none applies.
    """
    d = analysed(df)
    ok = d[d["ok"]]
    items: list[tuple[set[str], str]] = []
    if is_cpu(d, env):
        items.append(({"speed", "memory"}, "CPU host: timings show code paths and "
                      "relative effects, not GPU performance."))
    over = ok["flags"].str.contains("oversubscribed")
    if over.any():
        ceil = _fmt_set(ok.loc[over, "hw_ceiling_speedup"])
        items.append(({"speed"}, f"{_count(over, 'oversubscribed')} the hardware (more "
                      "workers × threads than usable cores, or more workers than GPUs): "
                      "their speedup cannot exceed the hardware ceiling"
                      + (f" ({ceil}×)" if ceil else "") + ", not the worker count."))
    emu = ok["flags"].str.contains("emulated-precision")
    if emu.any():
        what = _count(emu, "ran a precision this hardware only emulates")
        items.append(({"speed"}, f"{what} ({_fmt_set(ok.loc[emu, 'precision'])}): their "
                      "timings measure the emulation, not the precision."))
    for pattern, verb, text in _FLAG_CAVEATS:
        mask = ok["flags"].str.contains(pattern)
        if mask.any():
            items.append(({"speed"}, f"{_count(mask, verb)} {text}"))
    has_tp = ok["throughput_img_s"].notna()
    if has_tp.any() and not ok.loc[has_tp, "throughput_ci95_pct"].notna().any() \
            and not ok["throughput_spread_pct"].notna().any():
        items.append(({"speed"}, "No confidence interval recorded and no repeats: the "
                      "spread of each throughput is unknown."))
    if is_cpu(d, env) and ok["memory_mb"].notna().any():
        if (ok["memory_source"] == "workload").all():
            text = ("Memory is the workload's peak above the process baseline (taken "
                    "after imports and model build).")
        else:
            text = ("Memory on CPU is the process's peak RSS, most of it imported "
                    "libraries (hundreds of MiB): compare rows, not absolute values.")
        items.append(({"memory"}, text))
    items += [({"accuracy"}, t) for t in _accuracy_caveats(d)]
    return [t for topics, t in items if about is None or about in topics]

"""The reference study's tables in the report (segcore.results.study)."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from segcore.results import analysis, study


def study_row(run_id: str, world: int = 1, f1: float = 0.5, **kw) -> dict:
    s = study.session(study.session_of(run_id))
    r = {"sweep_id": "p", "run_id": run_id, "status": "ok", "engine": "ddp",
         "loader": "torch", "precision": "fp32", "world_size": world, "batch_size": s.batch,
         "widths": s.widths.replace(",", "-"), "arch": "paper", "image_size": 64,
         "class_scheme": s.classes, "num_classes": 2 if s.table in ("2", "5.1") else 6,
         "throughput_img_s": 10.0, "measured_steps": 30, "epochs": 1, "val_loss": 0.7,
         "F1": f1, "mDice": 0.4, "mConfDiag": 0.55, "mIoU": 0.3, "train_time_s": 2.0,
         "optimizer": "adamw", "schedule": "cosine", "lr_scaling": "linear", "patience": 0,
         "val_images": 12, "data_source": "synthetic", "device_type": "cpu"}
    r.update(kw)
    return r


@pytest.mark.parametrize("rid, name", [
    ("binaire-1", "binaire-1"), ("binaire-1-2", "binaire-1-2"), ("binaire-1-r1", "binaire-1"),
    ("binaire-1-2-w2-r0", "binaire-1-2"), ("multiclass-3-3-w4", "multiclass-3-3"),
    ("multiclass-3-ddp-bf16", "multiclass-3"), ("w2-six-u16-b4", None), ("binaire-9", None)])
def test_session_of_a_run_id(rid, name):
    assert study.session_of(rid) == name


def test_every_published_cell_is_filled():
    """All 45 cells of the study's Tables 2 and 4 (loss, F1, dice, diag, time for nine
    sessions), as printed in published-tables.md."""
    named = [s for s in study.SESSIONS if s.table in ("2", "4")]
    assert len(named) == 9
    for s in named:
        assert set(s.published) == {"loss", "F1", "dice", "diag", "time_s"}, s.name
    assert study.session("binaire-1-5").published == {
        "loss": 0.34, "F1": 0.63, "dice": 0.75, "diag": 0.81, "time_s": 28374}


def test_report_tables_repeats_workers_chance_and_setup():
    rows = [study_row("binaire-1-r0", f1=0.40), study_row("binaire-1-r1", f1=0.50),
            study_row("binaire-1-w2-r0", world=2, f1=0.45),
            study_row("multiclass-3-r0", f1=0.47), study_row("unlabeled-binary-r0", f1=0.47)]
    text = "\n".join(study.study_section(analysis.frame(pd.DataFrame(rows)), {}))
    # repeats reduced (median 0.45, ± half the range 0.05), n shown; 2 workers kept
    assert re.search(r"\| binaire-1 +\| 1 +\| 2 +\|.*\| 0\.45 ±0\.05 +\| 0\.59 ", text)
    assert re.search(r"\| binaire-1 +\| 2 +\| 1 +\|", text)
    # published loss and diag beside ours
    assert "| 0.58 " in text and "| 0.82 " in text
    # chance beside every binary metric; 0.50 for the median split
    assert text.count("*chance*") >= 4 and "0.50 for this median split" in text
    # multiclass: one column for F1 = macro Dice, never the same metric twice
    table4 = text.split("### Table 4")[1].split("###")[0]
    assert "F1 = dice" in table4 and "| dice  " not in table4
    # the setup differences and the data source
    assert "### How our runs differ from the study's" in text
    assert "resized to 512 x 512" in text and "Adam at a constant learning rate" in text
    assert "adamw, cosine schedule" in text and "no early stopping" in text
    assert "12 validation image(s) from synthetic" in text and "Synthetic data" in text


def test_no_session_rows_no_section():
    assert study.study_section(analysis.frame(pd.DataFrame(
        [{"run_id": "w1-six", "status": "ok"}])), {}) == []

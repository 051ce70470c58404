"""The cardiac figures (``medseg_monai.metrics.cardiac``) against values computed by hand: the
95 % Hausdorff distance with a missed structure scored, ejection fractions from voxel counts and
their agreement over patients, and the per-phase means of ``metrics.json``."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from medseg_monai.handlers import CaseMetrics, summarise_cases
from medseg_monai.metrics import (
    EjectionFractions,
    SurfaceDistance95Metric,
    ejection_fraction,
    ejection_fraction_summary,
)


def _onehot(label: torch.Tensor, n: int) -> torch.Tensor:
    """(X, Y, Z) class indices -> (1, n, X, Y, Z) one-hot."""
    return torch.nn.functional.one_hot(label.long(), n).permute(3, 0, 1, 2)[None].float()


def test_surface_distance_95_scores_a_shift_a_miss_and_an_absence() -> None:
    ref = torch.zeros(10, 12, 5)
    ref[2:6, 2:6, 1:3] = 1  # class 1: a 4 x 4 x 2 block
    ref[7:9, 8:10, 1:3] = 2  # class 2
    pred = torch.zeros_like(ref)
    pred[3:7, 2:6, 1:3] = 1  # class 1 moved one voxel along x; class 2 missed; class 3 absent in both
    distance = SurfaceDistance95Metric()(_onehot(pred, 4), _onehot(ref, 4))
    diagonal = math.sqrt(9**2 + 11**2 + 4**2)  # the farthest two voxels of a 10 x 12 x 5 grid
    assert distance[0, 0].item() == pytest.approx(1.0)
    assert distance[0, 1].item() == pytest.approx(diagonal)
    assert math.isnan(distance[0, 2].item())
    # a structure predicted where the reference has none is as wrong as one missed
    distance = SurfaceDistance95Metric()(_onehot(ref, 4), _onehot(pred, 4))
    assert distance[0, 1].item() == pytest.approx(diagonal)


def test_ejection_fraction_and_its_agreement_by_hand() -> None:
    assert ejection_fraction(200, 80) == pytest.approx(60.0)
    assert math.isnan(ejection_fraction(0, 0))
    rows = [
        {"ef_lv": 60.0, "ef_lv_ref": 55.0},  # +5
        {"ef_lv": 40.0, "ef_lv_ref": 50.0},  # -10
        {"ef_lv": 30.0, "ef_lv_ref": 25.0},  # +5
        {"ef_lv": math.nan, "ef_lv_ref": 40.0},  # left out
    ]
    summary = ejection_fraction_summary(rows, ["lv"])
    assert summary["ef_lv_mae"] == pytest.approx(20 / 3)
    assert summary["ef_lv_bias"] == pytest.approx(0.0)
    # Pearson's r of (60, 40, 30) and (55, 50, 25): means 43.33 / 43.33, deviations (16.67, -3.33,
    # -13.33) and (11.67, 6.67, -18.33): sum of products 416.67, sums of squares 466.67 and 516.67
    assert summary["ef_lv_corr"] == pytest.approx(416.6667 / math.sqrt(466.6667 * 516.6667), abs=1e-4)
    assert math.isnan(
        ejection_fraction_summary(rows[:2], ["lv"])["ef_lv_corr"]
    )  # r of 2 points means nothing


def _evaluator(cases: list[tuple[str, str, str, torch.Tensor, torch.Tensor]], handlers: list) -> Engine:
    """An engine whose iterations hand ``handlers`` one decollated case each, as MONAI's evaluator does."""

    def step(engine: Engine, case: tuple) -> list[dict]:
        cid, group, phase, pred, label = case
        engine.state.batch = [{"case_id": cid, "group": group, "phase": phase}]
        return [{"pred": pred, "label": label}]

    engine = Engine(step)
    for h in handlers:
        h.attach(engine)
    engine.run(cases, max_epochs=1)
    return engine


def test_ejection_fractions_pair_each_patients_frames_and_write_a_csv(tmp_path: Path) -> None:
    names = ["background", "rv_cavity", "myocardium", "lv_cavity"]

    def frame(lv: int, rv: int) -> torch.Tensor:  # (4, 20, 20, 1) one-hot with lv / rv voxels
        label = torch.zeros(20, 20, 1)
        label.view(-1)[:lv] = 3
        label.view(-1)[lv : lv + rv] = 1
        return _onehot(label, 4)[0]

    cases = [
        ("p1_ed", "p1", "ED", frame(100, 90), frame(100, 80)),
        ("p1_es", "p1", "ES", frame(40, 45), frame(50, 40)),
        ("p2_ed", "p2", "ED", frame(120, 60), frame(150, 60)),
        ("p2_es", "p2", "ES", frame(60, 30), frame(60, 30)),
    ]
    ef = EjectionFractions(names, output_path=str(tmp_path / "ef.csv"))
    _evaluator(cases, [ef])
    rows = ef.rows()
    assert rows["p1"]["ef_lv"] == pytest.approx(60.0) and rows["p1"]["ef_lv_ref"] == pytest.approx(50.0)
    assert rows["p1"]["ef_rv"] == pytest.approx(50.0) and rows["p1"]["ef_rv_ref"] == pytest.approx(50.0)
    assert rows["p2"]["ef_lv"] == pytest.approx(50.0) and rows["p2"]["ef_lv_ref"] == pytest.approx(60.0)
    summary = ef.summary()
    assert summary["ef_lv_mae"] == pytest.approx(10.0) and summary["ef_lv_bias"] == pytest.approx(0.0)
    assert summary["ef_rv_mae"] == pytest.approx(0.0)
    with open(tmp_path / "ef.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["patient"] for r in table] == ["p1", "p2"]
    assert float(table[0]["ef_lv_error"]) == pytest.approx(10.0)
    # the paper's LV class set has no RV: no RV ejection fraction
    lv_only = EjectionFractions(["background", "myocardium", "lv_cavity"])
    assert set(lv_only.channels) == {"lv"}


def test_case_metrics_average_each_phase_apart(tmp_path: Path) -> None:
    details = {"dice": torch.tensor([[0.8, 0.9], [0.6, 0.7], [1.0, np.nan]])}
    summary = summarise_cases(
        details, ["a_ed", "a_es", "b_ed"], ["myo", "lv"], groups={"a_ed": "ED", "a_es": "ES", "b_ed": "ED"}
    )
    assert summary["mean"]["dice_myo"] == pytest.approx(0.8)
    assert summary["by_group"]["ED"]["dice_myo"] == pytest.approx(0.9)  # (0.8 + 1.0) / 2
    assert summary["by_group"]["ED"]["dice_lv"] == pytest.approx(0.9)  # NaN left out
    assert summary["by_group"]["ES"]["dice"] == pytest.approx(0.65)
    # the handler names the section for what groups it and adds the per-patient table
    handler = CaseMetrics(
        {"m": "dice"},
        ["myo", "lv"],
        group_by="phase",
        summaries=[
            SimpleNamespace(
                summary=lambda: {"ef_lv_mae": 3.0}, sections=lambda: {"patients": {"a": {"ef_lv": 55.0}}}
            )
        ],
    )
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    engine.state.batch = [{"case_id": "a_ed", "phase": "ED"}, {"case_id": "a_es", "phase": "ES"}]
    handler._collect(engine)
    engine.state.metric_details = {"m": torch.tensor([[0.5, 0.7], [0.3, 0.1]])}
    handler._summarise(engine)
    out = engine.state.case_metrics
    assert out["by_phase"]["ES"]["dice"] == pytest.approx(0.2) and out["mean"]["ef_lv_mae"] == 3.0
    assert out["patients"] == {"a": {"ef_lv": 55.0}}

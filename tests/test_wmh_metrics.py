"""The WMH thesis's metrics on crafted volumes and against its own tables' arithmetic:
voxel metrics, lesion counting (Total = TP + FP), the large-lesion recall of the abstract and
the mean over 12-slice mini-batches (Røvang 2021, sec. 4.1, 7.3-7.5, Tables 8.5 and 8.17); and the
WMH 2017 challenge's five figures as its evaluation.py defines them, on volumes worked by hand and
against the ITK filters that script calls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.handlers import IgniteMetricHandler

from medseg_monai.handlers import CaseMetrics
from medseg_monai.losses import FocalTverskyLoss
from medseg_monai.metrics import (
    CHALLENGE_NAMES,
    ChallengeMetrics,
    LesionMetrics,
    MiniBatchMetrics,
    bracket_labels,
    challenge_metrics,
    lesion_rates,
    lesion_table,
    voxel_metrics,
)
from medseg_monai.metrics.lesions import _boundary

# ---------------------------------------------------------------- voxel metrics


def test_voxel_metrics_hand_computed() -> None:
    ref = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    prob = np.array([0.9, 0.5, 0.7, 0.2, 0.49, 0.6, 0.1, 0.0])  # 0.5 counts as lesion
    # TP 3, FN 2, FP 1
    m = voxel_metrics(prob, ref)
    assert m["dice"] == pytest.approx((6 + 2) / (6 + 1 + 2 + 2))
    assert m["recall"] == pytest.approx(5 / 7)
    assert m["precision"] == pytest.approx(5 / 6)
    assert m["f3"] == pytest.approx(30 / (30 + 1 + 9 * 2))
    plain = voxel_metrics(prob, ref, smooth=0)
    assert (plain["dice"], plain["recall"], plain["precision"]) == pytest.approx((6 / 9, 3 / 5, 3 / 4))
    assert voxel_metrics(prob, ref, beta=1, smooth=0)["f1"] == pytest.approx(plain["dice"])


def test_voxel_metrics_empty_masks_are_defined() -> None:
    empty, lesion = np.zeros((4, 4, 4)), np.zeros((4, 4, 4))
    lesion[1, 1, 1:3] = 1
    for smooth in (0.0, 2.0):
        assert voxel_metrics(empty, empty, smooth=smooth) == {"dice": 1, "recall": 1, "precision": 1, "f3": 1}
    missed = voxel_metrics(empty, lesion, smooth=0)
    assert missed == {"dice": 0, "recall": 0, "precision": 1, "f3": 0}
    spurious = voxel_metrics(lesion, empty, smooth=0)
    assert spurious == {"dice": 0, "recall": 1, "precision": 0, "f3": 0}
    assert voxel_metrics(lesion, empty)["dice"] == pytest.approx(2 / 4)  # (0 + 2) / (2 + 2)


# ---------------------------------------------------------------- lesion counting


# (TP, FN, FP) per bracket [0,10), [10,400), [400,1000), [1000,inf) and the printed Total,
# lesion precision and lesion recall of the thesis's tables
TABLE_8_17 = {
    "counts": [(3144, 6159, 6276), (3103, 734, 792), (116, 1, 1), (97, 3, 0)],
    "total": [9420, 3895, 117, 97],
    "precision": [0.33, 0.80, 0.99, 1.0],
    "recall": [0.34, 0.81, 0.99, 0.97],
}
TABLE_8_5 = {
    "counts": [(266, 289, 175), (147, 42, 25), (9, 0, 0), (7, 0, 0)],
    "total": [441, 172, 9, 7],
    "precision": [0.60, 0.85, 1.0, 1.0],
    "recall": [0.48, 0.78, 1.0, 1.0],  # the table prints 0.49 for 266 / (266 + 289) = 0.479
}


@pytest.mark.parametrize("table", [TABLE_8_17, TABLE_8_5], ids=["table_8_17", "table_8_5"])
def test_lesion_rates_reproduce_the_tables_arithmetic(table: dict) -> None:
    for (tp, fn, fp), total, precision, recall in zip(
        table["counts"], table["total"], table["precision"], table["recall"], strict=True
    ):
        rates = lesion_rates(tp, fn, fp)
        assert rates["n_pred"] == total  # the tables' Total (predicted lesions) = TP + FP
        assert round(rates["lesion_precision"], 2) == precision
        assert round(rates["lesion_recall"], 2) == recall


def test_abstract_average_recall_is_the_large_lesion_bracket() -> None:
    # Table 8.17's Avg. recall (smooth) per bracket: -, 0.80, 0.94, 0.93; the abstract's 0.93
    # is the [1000, inf) entry, the mean from 10 voxels up would be 0.89
    brackets = [math.nan, 0.80, 0.94, 0.93]
    assert round(float(np.mean(brackets[1:])), 2) == 0.89
    ref = np.zeros((40, 40, 40), bool)
    ref[0:11, 0:10, 0:10] = True  # a 1100-voxel lesion, 1010 voxels of it predicted
    ref[30:33, 30:33, 30:33] = True  # a 27-voxel lesion, missed
    pred = ref.copy()
    pred[0:1, 0:9, 0:10] = False
    pred[30:33, 30:33, 30:33] = False
    metric = LesionMetrics()
    metric(
        torch.as_tensor(pred, dtype=torch.float32)[None, None],
        torch.as_tensor(ref, dtype=torch.float32)[None, None],
    )
    summary = metric.summary()
    assert summary["large_lesion_recall"] == pytest.approx((1010 + 2) / (1100 + 2))
    assert summary["avg_recall_10-400"] == pytest.approx(2 / 29)


def test_partly_found_lesion_is_a_miss_and_its_component_a_false_positive() -> None:
    ref, pred = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    ref[0:2, 0:4, 0:4] = True  # 32 voxels
    pred[0, 0, 0:4] = True  # 4 of them predicted: 12.5 % < 60 %
    t = lesion_table(pred, ref)
    assert (t["10-400"]["fn"], t["10-400"]["tp"]) == (1, 0)
    assert (t["0-10"]["fp"], t["0-10"]["n_pred"]) == (1, 1)  # the 4-voxel component, by its own size
    assert t["all"]["lesion_precision"] == 0 and t["all"]["lesion_recall"] == 0


def test_lesion_detection_threshold_60_percent() -> None:
    ref, pred = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    ref[1, 1, 0:5] = True  # 5 voxels, 3 predicted: 60 % -> TP
    pred[1, 1, 0:3] = True
    ref[6, 6, 0:4] = True  # 4 voxels, 2 predicted: 50 % -> FN, and its component a FP
    pred[6, 6, 2:4] = True
    t = lesion_table(pred, ref)
    assert (t["0-10"]["n_ref"], t["0-10"]["tp"], t["0-10"]["fn"], t["0-10"]["fp"]) == (2, 1, 1, 1)
    assert t["all"]["lesion_recall"] == 0.5 and t["all"]["lesion_precision"] == 0.5
    assert t["0-10"]["avg_recall"] == pytest.approx(((3 + 2) / (5 + 2) + (2 + 2) / (4 + 2)) / 2)
    relaxed = lesion_table(pred, ref, detection=0.5)["all"]
    assert (relaxed["tp"], relaxed["fp"]) == (2, 0)


def test_components_of_one_detection_are_not_false_positives() -> None:
    ref, pred = np.zeros((20, 20, 20), bool), np.zeros((20, 20, 20), bool)
    ref[0, 0:10, 0] = True  # 10 voxels found by two predicted pieces (8 voxels, 80 %)
    pred[0, 0:4, 0] = pred[0, 6:10, 0] = True
    ref[10, 0:3, 0] = ref[10, 4:7, 0] = True  # two 3-voxel lesions bridged by one component
    pred[10, 0:7, 0] = True
    t = lesion_table(pred, ref)
    assert (t["all"]["tp"], t["all"]["fn"], t["all"]["fp"]) == (3, 0, 0)
    assert t["all"]["n_pred"] == t["all"]["tp"] + t["all"]["fp"]
    assert t["all"]["lesion_precision"] == 1.0


def _bracket_volume() -> np.ndarray:
    """Rectangles of 9, 10, 399, 400, 999 and 1000 voxels on separate slices."""
    v = np.zeros((12, 140, 12), bool)
    for z, (h, w) in zip(
        range(0, 12, 2), [(1, 9), (1, 10), (3, 133), (4, 100), (9, 111), (10, 100)], strict=True
    ):
        v[:h, :w, z] = True
    return v


def test_lesion_bracket_edges_and_empty_ratios() -> None:
    lesions = _bracket_volume()
    empty = np.zeros_like(lesions)
    labels = bracket_labels()
    assert labels == ["0-10", "10-400", "400-1000", "1000-inf"]
    found = lesion_table(lesions, lesions)
    assert [found[b]["tp"] for b in labels] == [1, 2, 2, 1]
    assert [found[b]["n_pred"] for b in labels] == [1, 2, 2, 1]
    missed = lesion_table(empty, lesions)
    assert [missed[b]["fn"] for b in labels] == [1, 2, 2, 1]
    # nothing predicted while lesions exist: precision 0, not a flattering 1
    assert [missed[b]["lesion_precision"] for b in labels] == [0, 0, 0, 0]
    assert [missed[b]["lesion_recall"] for b in labels] == [0, 0, 0, 0]
    spurious = lesion_table(lesions, empty)  # false positives in the bracket of their own size
    assert [spurious[b]["fp"] for b in labels] == [1, 2, 2, 1]
    assert spurious["all"]["lesion_precision"] == 0 and spurious["all"]["lesion_recall"] == 0
    assert all(math.isnan(spurious[b]["avg_recall"]) for b in labels)  # no reference lesion: "-"


def test_lesion_table_empty_masks_and_connectivity() -> None:
    empty = np.zeros((5, 5, 5))
    row = lesion_table(empty, empty)["all"]
    assert {k: v for k, v in row.items() if k != "avg_recall"} == {
        "n_ref": 0,
        "n_pred": 0,
        "tp": 0,
        "fn": 0,
        "fp": 0,
        "lesion_precision": 1,  # nothing to find and nothing found
        "lesion_recall": 1,
    }
    assert math.isnan(row["avg_recall"])
    diagonal = np.zeros((5, 5, 5))
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = 1
    assert lesion_table(diagonal, diagonal)["all"]["n_ref"] == 1  # 26-connected
    assert lesion_table(diagonal, diagonal, connectivity=1)["all"]["n_ref"] == 2


def test_ignore_mask_excluded_from_voxels_and_lesions() -> None:
    ref, pred, ignore = np.zeros((10, 10, 10)), np.zeros((10, 10, 10)), np.zeros((10, 10, 10))
    ref[1, 1, 1:4] = 1  # found
    pred[1, 1, 1:4] = 1
    ignore[6:9, 6:9, 6:9] = 1
    ref[7, 7, 7] = 1  # a lesion inside the ignored region: not missed
    pred[6, 6, 6:9] = 1  # a prediction inside it: not a false positive
    t = lesion_table(pred, ref, ignore)
    assert (t["all"]["n_ref"], t["all"]["tp"], t["all"]["fn"], t["all"]["fp"]) == (1, 1, 0, 0)
    assert voxel_metrics(pred, ref, ignore, smooth=0) == {"dice": 1, "recall": 1, "precision": 1, "f3": 1}
    t_all = lesion_table(pred, ref)
    assert (t_all["all"]["fn"], t_all["all"]["fp"]) == (1, 1)


def _cases() -> tuple[torch.Tensor, torch.Tensor]:
    """Three (1, 12, 140, 12) cases: all found; the 10-voxel lesion missed and ignored voxels; empty."""
    lesions = torch.as_tensor(_bracket_volume(), dtype=torch.float32)[None]
    y = torch.stack([lesions, lesions.clone(), torch.zeros_like(lesions)])
    y_pred = y.clone() * 0.8
    y_pred[1, 0, :, :, 2] = 0.1  # missed 10-voxel lesion
    y[1, 0, 11, 139, 11] = -1  # an ignored voxel, predicted
    y_pred[1, 0, 11, 139, 11] = 0.9
    return y_pred, y


def test_lesion_metrics_rows_and_pooled_summary_in_an_evaluator() -> None:
    y_pred, y = _cases()
    metric = LesionMetrics(ignore_index=-1)
    handler = IgniteMetricHandler(metric_fn=metric, save_details=True)
    batches = [(y_pred[:2], y[:2]), (y_pred[2:], y[2:])]  # batch sizes 2 and 1
    engine = Engine(lambda e, batch: batch)
    handler.attach(engine, "lesions")
    engine.run(batches, max_epochs=1)

    details = engine.state.metric_details["lesions"]
    assert details.shape == (3, len(metric.names))
    rows = [dict(zip(metric.names, r.tolist(), strict=True)) for r in details]
    assert rows[0]["tp"] == 6 and rows[0]["volume_dice"] == pytest.approx(1.0)
    assert rows[0]["large_lesion_recall"] == pytest.approx(1.0)
    assert rows[1]["fn"] == 1 and rows[1]["fn_10-400"] == 1 and rows[1]["fp"] == 0
    assert rows[1]["tp_0-10"] == 1 and rows[1]["n_ref_1000-inf"] == 1
    single = lesion_table(y_pred[1, 0].numpy(), y[1, 0].numpy(), ignore=(y[1, 0] == -1).numpy())
    assert rows[1]["avg_recall_10-400"] == pytest.approx(single["10-400"]["avg_recall"])
    assert rows[1]["volume_recall"] == pytest.approx(voxel_metrics(y_pred[1], y[1], y[1] == -1)["recall"])
    assert rows[2]["n_ref"] == 0 and rows[2]["volume_dice"] == 1 and rows[2]["lesion_recall"] == 1
    assert math.isnan(rows[2]["large_lesion_recall"])  # a case without large lesions has none

    summary = metric.summary()
    assert summary["n_ref_10-400"] == 4 and summary["tp_10-400"] == 3 and summary["fp"] == 0
    assert summary["avg_recall_10-400"] == pytest.approx((1 + 1 + 1 + 2 / 12) / 4)
    assert summary["lesion_recall"] == pytest.approx(11 / 12)  # pooled counts, not a mean of cases
    assert summary["volume_dice"] == pytest.approx(np.mean([r["volume_dice"] for r in rows]))
    tp, fp, fn = (sum(r[f"voxel_{c}"] for r in rows) for c in ("tp", "fp", "fn"))
    assert summary["pooled_dice"] == pytest.approx((2 * tp + 2) / (2 * tp + fp + fn + 2))
    assert engine.state.metrics["lesions"] == pytest.approx(summary["large_lesion_recall"])


# ---------------------------------------------------------------- mini-batch aggregation


def _volumes() -> tuple[torch.Tensor, torch.Tensor]:
    """Two (1, 1, 6, 6, 10) volumes: 20 slices, lesions on a few, one slice with false positives."""
    gen = torch.Generator().manual_seed(0)
    y = torch.zeros(2, 1, 6, 6, 10)
    y[0, 0, 1:4, 1:4, 2:5] = 1
    y[1, 0, 2:5, 2:4, 6:9] = 1
    y[1, 0, 0, 0, 7] = -1  # ignored
    y_pred = (y.clamp_min(0) * 0.7 + 0.25 * torch.rand(y.shape, generator=gen)).clamp(0, 1)
    y_pred[0, 0, :, :, 9] = 0.9  # a slice of false positives
    return y_pred, y


def test_mini_batch_metrics_average_flattened_12_slice_batches() -> None:
    y_pred, y = _volumes()
    loss = FocalTverskyLoss(alpha=0.85, beta=0.15, gamma=4 / 3, smooth=2.0, sigmoid=False, ignore_index=-1)
    metric = MiniBatchMetrics(loss=loss, batch_size=8, slice_axis=2, ignore_index=-1)
    metric(y_pred[:1], y[:1])  # one volume per call, as the evaluator gives them
    metric(y_pred[1:], y[1:])
    summary = metric.summary()

    # by hand: the 20 slices in order, mini-batches of slices 0-7, 8-15 (across the two volumes)
    # and 16-19, each flattened
    slices_p = torch.cat([y_pred[i, 0].permute(2, 0, 1) for i in range(2)])  # (20, 6, 6)
    slices_r = torch.cat([y[i, 0].permute(2, 0, 1) for i in range(2)])
    batches = [(slices_p[i : i + 8], slices_r[i : i + 8]) for i in (0, 8, 16)]
    expected = [voxel_metrics(p, r, ignore=r == -1) for p, r in batches]
    for name in ("dice", "recall", "precision", "f3"):
        assert summary[name] == pytest.approx(np.mean([e[name] for e in expected]))
    losses = [loss(p[:, None], r[:, None]) for p, r in batches]  # (8, 1, 6, 6): one TI per batch
    assert summary["loss"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)
    assert metric.aggregate().item() == pytest.approx(summary["loss"])
    # per volume, the figures differ: the aggregation is not a mean over volumes
    per_volume = np.mean([voxel_metrics(y_pred[i], y[i], y[i] == -1)["dice"] for i in range(2)])
    assert summary["dice"] != pytest.approx(per_volume)


def test_mini_batch_metrics_count_empty_batches() -> None:
    y = torch.zeros(1, 1, 4, 4, 24)
    y[0, 0, 1:3, 1:3, 0:3] = 1  # lesions in the first mini-batch only
    y_pred = y.clone()
    metric = MiniBatchMetrics(batch_size=12)
    metric(y_pred, y)
    assert metric.summary()["dice"] == 1.0  # the empty second batch, empty prediction: 1
    y_pred[0, 0, 0, 0, 20] = 1  # one false positive voxel in the empty batch
    metric.reset()
    metric(y_pred, y)
    assert metric.summary()["dice"] == pytest.approx((1 + 2 / 3) / 2)  # (0 + 2) / (1 + 2)
    assert metric.summary()["f3"] == pytest.approx((1 + 0) / 2)
    with pytest.raises(ValueError, match="batch_size"):
        MiniBatchMetrics(batch_size=0)


def test_case_metrics_mean_takes_the_data_set_figures() -> None:
    y_pred, y = _volumes()
    minibatch = IgniteMetricHandler(metric_fn=MiniBatchMetrics(batch_size=12, ignore_index=-1))
    lesions = IgniteMetricHandler(metric_fn=LesionMetrics(ignore_index=-1), save_details=True)
    engine = Engine(lambda e, batch: (batch["pred"], batch["label"]))
    minibatch.attach(engine, "val_loss")
    lesions.attach(engine, "lesions")
    cases = CaseMetrics(
        {"lesions": "lesions"},
        ["wmh"],
        columns={"lesions": list(lesions.metric_fn.names)},
        summaries=[minibatch, lesions],
        aliases={"dice": "dice_wmh"},
    )
    cases.attach(engine)
    batches = [{"case_id": [f"case{i}"], "pred": y_pred[i : i + 1], "label": y[i : i + 1]} for i in range(2)]
    engine.run(batches, max_epochs=1)
    mean = engine.state.case_metrics["mean"]
    assert mean["dice"] == pytest.approx(minibatch.metric_fn.summary()["dice"]) == mean["dice_wmh"]
    assert mean["lesion_recall"] == pytest.approx(lesions.metric_fn.summary()["lesion_recall"])
    assert set(engine.state.case_metrics["cases"]) == {"case0", "case1"}
    assert "volume_dice" in engine.state.case_metrics["cases"]["case0"]


# ---------------------------------------------------------------- the WMH 2017 challenge's figures


def test_challenge_figures_worked_by_hand() -> None:
    ref, pred = np.zeros((20, 20, 10), bool), np.zeros((20, 20, 10), bool)
    ref[2:5, 2:5, 2] = True  # lesion A, 9 voxels
    ref[10, 10, 5] = True  # lesion B, 1 voxel, missed
    pred[3:6, 2:5, 2] = True  # A shifted one row: 6 of its voxels, 3 outside
    pred[15, 15, 8] = pred[15, 16, 8] = True  # a 2-voxel false positive
    pred[0, 19, 0] = True  # a 1-voxel false positive
    m = challenge_metrics(pred, ref)
    assert m["challenge_dice"] == pytest.approx(2 * 6 / (12 + 10))  # |P| 12, |R| 10, overlap 6
    assert m["challenge_avd"] == pytest.approx(abs(10 - 12) / 10 * 100)  # 20 %
    # lesions found by any overlap: A of A, B -> 1/2; detections on a lesion: 1 of 3 -> 1/3
    assert m["challenge_lesion_recall"] == pytest.approx(1 / 2)
    assert m["challenge_lesion_f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))  # 0.4
    assert list(m) == list(CHALLENGE_NAMES)


def test_challenge_lesions_are_26_connected_and_any_overlap_detects() -> None:
    ref, pred = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    ref[1, 1, 1] = ref[2, 2, 2] = True  # touching by a corner: one lesion
    ref[5, 5, 1:6] = True  # 5 voxels, 1 of them predicted: detected (no 60 % rule)
    pred[5, 5, 3] = True
    m = challenge_metrics(pred, ref)
    assert m["challenge_lesion_recall"] == 0.5  # 1 of the 2 lesions
    assert m["challenge_lesion_f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)  # precision 1 of 1


def test_challenge_hd95_percentile_spacing_and_both_directions() -> None:
    spacing = np.diag([0.5, 0.5, 3.0, 1.0])
    ref, pred = np.zeros((12, 12, 8), bool), np.zeros((12, 12, 8), bool)
    ref[5, 5, 5] = True
    pred[5, 5, 7] = True  # two slices away: 2 x 3 mm
    assert challenge_metrics(pred, ref, affine=spacing)["challenge_hd95"] == pytest.approx(6.0)
    pred[:] = False
    pred[5, 5, 5] = pred[5, 9, 5] = True  # predicted -> reference: 0 and 4 x 0.5 mm; back: 0
    # numpy's 95th percentile of [0, 2] interpolates: 0 + 0.95 x 2
    assert challenge_metrics(pred, ref, affine=spacing)["challenge_hd95"] == pytest.approx(1.9)
    assert challenge_metrics(ref, pred, affine=spacing)["challenge_hd95"] == pytest.approx(1.9)


def test_challenge_hd95_boundaries_are_in_plane_and_the_border_is_foreground() -> None:
    ref, pred = np.zeros((10, 10, 3), bool), np.zeros((10, 10, 3), bool)
    ref[3:8, 3:8, 1] = True  # a 5 x 5 square in one slice: its 16-voxel ring is the boundary
    pred[5, 5, 1] = True  # its centre
    # centre -> ring: 2 voxels; ring -> centre: 4 x 2, 8 x sqrt(5), 4 x sqrt(8); the 95th
    # percentile of those 16 lies between the two largest, both sqrt(8)
    assert challenge_metrics(pred, ref)["challenge_hd95"] == pytest.approx(math.sqrt(8))
    ref[:], pred[:] = False, False
    ref[0:5, 0:5, 1] = True  # against the image's corner: the border is not an edge
    pred[0, 0, 1] = True
    # boundary: row 4 and column 4 (9 voxels), at 4, 4, sqrt(17) x 2, sqrt(20) x 2, 5, 5, sqrt(32)
    # from the corner voxel; the 95th percentile: 5 + 0.6 x (sqrt(32) - 5)
    expected = 5 + 0.6 * (math.sqrt(32) - 5)
    assert challenge_metrics(pred, ref)["challenge_hd95"] == pytest.approx(expected)


def test_challenge_undefined_figures_and_other_pathology() -> None:
    ref, empty = np.zeros((6, 6, 4), bool), np.zeros((6, 6, 4), bool)
    ref[2:4, 2:4, 1] = True
    missed = challenge_metrics(empty, ref)
    assert math.isnan(missed["challenge_hd95"])  # the script: undefined when nothing is found
    assert missed["challenge_dice"] == 0 and missed["challenge_avd"] == 100
    assert missed["challenge_lesion_recall"] == 0 and missed["challenge_lesion_f1"] == 0
    nothing = challenge_metrics(empty, empty)
    assert math.isnan(nothing["challenge_dice"]) and math.isnan(nothing["challenge_avd"])
    assert nothing["challenge_lesion_recall"] == 1 and nothing["challenge_lesion_f1"] == 1
    other = np.zeros_like(ref)
    other[0, 0, 3] = True  # label 2 in the challenge: a prediction there is removed
    pred = ref | other
    assert challenge_metrics(pred, ref, ignore=other)["challenge_dice"] == 1.0
    assert challenge_metrics(pred, ref)["challenge_dice"] == pytest.approx(8 / 9)


def _itk_edge(img: sitk.Image) -> np.ndarray:
    """The script's ORIGINAL - ERODED boundary, back in our (x, y, z) order."""
    edge = sitk.GetArrayFromImage(sitk.Subtract(img, sitk.BinaryErode(img, (1, 1, 0))))
    return edge.transpose(2, 1, 0) > 0


def _itk_figures(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float, float]:
    """HD95, lesion recall and F1 through the ITK filters the challenge's evaluation.py uses
    (BinaryErode (1, 1, 0), fully connected ConnectedComponent), our (x, y, z) as ITK's index."""
    from scipy.spatial import cKDTree

    def image(a: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(a.astype(np.uint8).transpose(2, 1, 0))
        img.SetSpacing(spacing)
        return img

    p, r = image(pred), image(ref)
    points = []
    for img in (r, p):
        index = np.argwhere(_itk_edge(img))
        points.append(np.array([img.TransformIndexToPhysicalPoint([int(v) for v in i]) for i in index]))
    d_pr, d_rp = cKDTree(points[0]).query(points[1])[0], cKDTree(points[1]).query(points[0])[0]
    hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    cc = sitk.ConnectedComponentImageFilter()
    cc.SetFullyConnected(True)
    ref_lab, pred_lab = (sitk.GetArrayFromImage(cc.Execute(img)) for img in (r, p))
    hit = (sitk.GetArrayFromImage(p) > 0) & (sitk.GetArrayFromImage(r) > 0)
    recall = len(np.unique(ref_lab[hit])) / (len(np.unique(ref_lab)) - 1)
    precision = len(np.unique(pred_lab[hit])) / (len(np.unique(pred_lab)) - 1)
    return hd95, recall, 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_challenge_figures_match_the_itk_filters_of_the_script(seed: int) -> None:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    ref = ndimage.binary_dilation(rng.random((24, 20, 9)) > 0.985, iterations=2)
    pred = ndimage.binary_dilation(ref & (rng.random(ref.shape) > 0.4), iterations=1)
    pred |= rng.random(ref.shape) > 0.995  # scattered false positives, some on the border
    spacing = (0.9, 1.1, 3.0)
    for mask in (ref, pred):  # the same boundary voxels, lesions on the image's border included
        itk_edge = _itk_edge(sitk.GetImageFromArray(mask.astype(np.uint8).transpose(2, 1, 0)))
        assert np.array_equal(_boundary(mask, -1), itk_edge)
    m = challenge_metrics(pred, ref, affine=np.diag([*spacing, 1.0]))
    hd95, recall, f1 = _itk_figures(pred, ref, spacing)
    assert m["challenge_hd95"] == pytest.approx(hd95)
    assert m["challenge_lesion_recall"] == pytest.approx(recall)
    assert m["challenge_lesion_f1"] == pytest.approx(f1)


def test_challenge_metrics_per_case_in_mm_from_the_label_affine() -> None:
    y = torch.zeros(2, 1, 12, 12, 8)
    y[:, 0, 5, 5, 5] = 1
    y[0, 0, 0, 0, 0] = -1  # other pathology
    y_pred = torch.zeros_like(y)
    y_pred[0, 0, 5, 5, 5] = 0.7  # case 0: the lesion and a voxel two slices off (0 and 6 mm)
    y_pred[0, 0, 5, 5, 7] = 0.9  # case 1: nothing predicted
    y_pred[0, 0, 0, 0, 0] = 0.8  # on other pathology: not counted
    affine = torch.diag(torch.tensor([0.5, 0.5, 3.0, 1.0]))
    metric = ChallengeMetrics(ignore_index=-1)
    handler = IgniteMetricHandler(metric_fn=metric, save_details=True)
    engine = Engine(lambda e, batch: batch)
    handler.attach(engine, "challenge")
    # decollated cases, as the evaluators' from_engine gives them, each with its affine
    batch = ([y_pred[i] for i in range(2)], [MetaTensor(y[i], affine=affine) for i in range(2)])
    engine.run([batch], max_epochs=1)
    rows = [
        dict(zip(metric.names, r.tolist(), strict=True)) for r in engine.state.metric_details["challenge"]
    ]
    assert rows[0]["challenge_hd95"] == pytest.approx(0.95 * 6.0)  # 95th percentile of [0, 6]
    assert rows[0]["challenge_dice"] == pytest.approx(2 / 3) and rows[0]["challenge_avd"] == 100
    assert math.isnan(rows[1]["challenge_hd95"]) and rows[1]["challenge_dice"] == 0
    summary = metric.summary()  # the mean over cases, an undefined figure left out
    assert summary["challenge_hd95"] == pytest.approx(5.7)
    assert summary["challenge_dice"] == pytest.approx(1 / 3)
    assert engine.state.metrics["challenge"] == pytest.approx(1 / 3)

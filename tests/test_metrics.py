"""finetune.metrics against values worked out by hand on tiny masks, and the empty-mask conventions."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.metrics import METRICS, auc, boundary, case_metrics, summarise


def grid(rows: list[str]) -> np.ndarray:
    """'.#' picture -> bool array (# = vessel)."""
    return np.array([[ch == "#" for ch in row] for row in rows], bool)


# label: a 2x2 block; prediction: 3 of its pixels plus one false positive to the right
LABEL_4 = grid([".##.", ".##.", "....", "...."])
PRED_4 = grid([".#..", ".###", "....", "...."])


def test_overlap_metrics_by_hand() -> None:
    m = case_metrics(PRED_4, LABEL_4)
    # TP 3, FP 1 at (1,3), FN 1 at (0,2), TN 16 - 5 = 11
    assert m["dice"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))  # 0.75
    assert m["iou"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(11 / 12)
    assert m["auc"] is None  # no probabilities given


def test_fov_restricts_every_count() -> None:
    fov = np.ones((4, 4), bool)
    fov[:, 3] = False  # the false positive at (1,3) lies outside
    m = case_metrics(PRED_4, LABEL_4, fov)
    # inside: 12 px, TP 3, FP 0, FN 1, TN 8
    assert m["dice"] == pytest.approx(6 / 7)
    assert m["iou"] == pytest.approx(3 / 4)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(1.0)


def test_inputs_of_any_dtype_nonzero_is_vessel() -> None:
    as_255 = np.where(PRED_4, 255, 0).astype(np.uint8)
    assert case_metrics(as_255, LABEL_4.astype(np.uint8))["dice"] == pytest.approx(0.75)


def test_boundary_is_the_ring_of_a_block() -> None:
    block = grid(["......", ".####.", ".####.", ".####.", ".####.", "......"])
    ring = block.copy()
    ring[2:4, 2:4] = False  # the 2x2 inside has all 4 neighbours in the block
    assert np.array_equal(boundary(block), ring)
    edge = grid(["##", "##"])  # touching the image border counts as outside
    assert boundary(edge).all()


def test_nsd_by_hand() -> None:
    # label: column 0. prediction: column 2 in rows 0-2 (2 px away: within tolerance), column 5 in rows 3-5
    # (5 px away). Lines are all boundary. Prediction side: 3 of 6 close. Label side: rows 0-2 are 2 px from
    # column 2; rows 3-5 are sqrt(5) = 2.24 px from (2, 2) at best: 3 of 6 close. NSD = (3 + 3) / 12.
    label = np.zeros((6, 6), bool)
    label[:, 0] = True
    pred = np.zeros((6, 6), bool)
    pred[0:3, 2] = True
    pred[3:6, 5] = True
    m = case_metrics(pred, label)
    assert m["nsd"] == pytest.approx(0.5)
    assert m["dice"] == 0.0
    assert m["specificity"] == pytest.approx(24 / 30)
    # moving the far half one column closer (to 2 px) makes every boundary pixel close
    pred[3:6, 5] = False
    pred[3:6, 2] = True
    assert case_metrics(pred, label)["nsd"] == pytest.approx(1.0)


def test_cldice_by_hand() -> None:
    # label: row 2 across the image (its own skeleton); prediction: its left half.
    # Tprec = |S(pred) & label| / |S(pred)| = 3/3; Tsens = |S(label) & pred| / |S(label)| = 3/6.
    label = np.zeros((6, 6), bool)
    label[2, :] = True
    pred = np.zeros((6, 6), bool)
    pred[2, :3] = True
    m = case_metrics(pred, label)
    assert m["cldice"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # 2/3
    assert m["dice"] == pytest.approx(6 / 9)
    # a parallel line 1 px off: no skeleton pixel of one lies in the other
    off = np.zeros((6, 6), bool)
    off[3, :] = True
    assert case_metrics(off, label)["cldice"] == 0.0


def test_auc_by_hand_with_ties() -> None:
    # positives score 0.4 and 0.9, negatives 0.4 and 0.2: pairs (0.4 vs 0.4) 1/2, the other three 1 -> 3.5/4
    prob = np.array([[0.4, 0.4], [0.2, 0.9]])
    label = np.array([[1, 0], [0, 1]])
    m = case_metrics(prob > 0.5, label, prob=prob)
    assert m["auc"] == pytest.approx(0.875)
    # textbook example: scores 0.1, 0.4 (neg), 0.35, 0.8 (pos) -> 3 of 4 pairs ordered -> 0.75
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == pytest.approx(0.75)
    # a binary score gives (sensitivity + specificity) / 2
    m = case_metrics(PRED_4, LABEL_4, prob=PRED_4.astype(float))
    assert m["auc"] == pytest.approx((3 / 4 + 11 / 12) / 2)


def test_auc_respects_fov() -> None:
    prob = np.array([[0.9, 0.1], [0.8, 0.95]])
    label = np.array([[1, 0], [0, 0]])
    fov = np.array([[1, 1], [1, 0]])  # drops the high-scoring negative at (1,1)
    assert case_metrics(prob > 0.5, label, prob=prob)["auc"] == pytest.approx(2 / 3)
    assert case_metrics(prob > 0.5, label, fov, prob=prob)["auc"] == pytest.approx(1.0)


def test_empty_prediction() -> None:
    m = case_metrics(np.zeros((4, 4), bool), LABEL_4)
    assert (m["dice"], m["iou"], m["cldice"], m["nsd"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["sensitivity"] == 0.0
    assert m["specificity"] == 1.0


def test_empty_label() -> None:
    empty = np.zeros((4, 4), bool)
    both = case_metrics(empty, empty, prob=np.zeros((4, 4)))
    assert (both["dice"], both["iou"], both["cldice"], both["nsd"]) == (1.0, 1.0, 1.0, 1.0)
    assert both["sensitivity"] is None and both["auc"] is None
    assert both["specificity"] == 1.0
    claimed = case_metrics(PRED_4, empty)
    assert (claimed["dice"], claimed["iou"], claimed["cldice"], claimed["nsd"]) == (0.0, 0.0, 0.0, 0.0)
    assert claimed["sensitivity"] is None
    assert claimed["specificity"] == pytest.approx(12 / 16)


def test_bad_inputs_are_value_errors() -> None:
    with pytest.raises(ValueError, match="prediction: shape"):
        case_metrics(np.zeros((4, 5), bool), LABEL_4)
    with pytest.raises(ValueError, match="fov"):
        case_metrics(PRED_4, LABEL_4, np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="probabilities"):
        case_metrics(PRED_4, LABEL_4, prob=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="HxW"):
        case_metrics(np.zeros((4, 4, 3)), LABEL_4)


def test_summarise_skips_undefined_values() -> None:
    cases = [case_metrics(PRED_4, LABEL_4), case_metrics(np.zeros((4, 4), bool), np.zeros((4, 4), bool))]
    s = summarise(cases)
    assert set(s) == set(METRICS)
    assert s["dice"]["n"] == 2 and s["dice"]["mean"] == pytest.approx((0.75 + 1.0) / 2)
    assert s["dice"]["std"] == pytest.approx(0.125)
    assert s["sensitivity"]["n"] == 1 and s["sensitivity"]["mean"] == pytest.approx(0.75)
    assert s["auc"] == {"mean": None, "std": None, "min": None, "max": None, "n": 0}

"""Per-case segmentation scores, computed inside the field of view when one is given.

    scores = case_metrics(pred_HW, label_HW, fov_HW, prob_HW)   # dict: name -> float, or None if undefined

Inputs: `pred` and `label` are HxW masks (bool, or any dtype where non-zero = vessel); `fov` likewise or
None (every pixel counts); `prob` an optional HxW float map in [0, 1] for AUC.

Definitions (TP, FP, FN, TN counted over FOV pixels):
- dice = 2 TP / (2 TP + FP + FN); iou = TP / (TP + FP + FN).
- cldice (Shit et al., CVPR 2021): with S(.) the skeleton (skimage.morphology.skeletonize, of the mask
  cut to the FOV), Tprec = |S(pred) & label| / |S(pred)|, Tsens = |S(label) & pred| / |S(label)|,
  cldice = 2 Tprec Tsens / (Tprec + Tsens).
- nsd (normalised surface Dice, Nikolov et al. 2021) at tolerance tau = 2 px: the boundary of a mask is
  its pixels with a 4-neighbour outside it (image border and FOV edge count as outside);
  nsd = (|B_pred within tau of B_label| + |B_label within tau of B_pred|) / (|B_pred| + |B_label|),
  distances Euclidean between pixel centres. A vessel 1-2 px wide is all boundary, so this is the share of
  vessel pixels of either mask lying within 2 px of the other mask's vessel.
- auc: area under the ROC curve of `prob` against the label, via the Mann-Whitney rank statistic with
  tied scores getting their average rank (so a binary map gives (sensitivity + specificity) / 2).
- sensitivity = TP / (TP + FN); specificity = TN / (TN + FP).

Empty masks: when label and prediction are both empty, dice, iou, cldice and nsd are 1 (nothing to find,
nothing claimed); when exactly one is empty they are 0. Sensitivity is None (undefined) without label
pixels, specificity None without background pixels, auc None unless both classes are present. Averages
over cases skip None values and say how many cases they used.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata
from skimage.morphology import skeletonize

NSD_TOLERANCE_PX = 2.0  # surface-distance tolerance of nsd (px)

# The metric names case_metrics returns, in report order.
METRICS: tuple[str, ...] = ("dice", "iou", "cldice", "nsd", "auc", "sensitivity", "specificity")


def _binary(name: str, array: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        raise ValueError(
            f"{name}: expected an HxW array, got {getattr(array, 'shape', type(array).__name__)}"
        )
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name}: shape {array.shape} does not match the label's {shape}")
    return array > 0


def _overlap_score(numerator: float, denominator: float, pred_any: bool, label_any: bool) -> float:
    if not pred_any and not label_any:
        return 1.0
    if not pred_any or not label_any:
        return 0.0
    return numerator / denominator


def dice(pred: np.ndarray, label: np.ndarray) -> float:
    """2|P & L| / (|P| + |L|) of two boolean masks (1 when both are empty)."""
    tp = float(np.count_nonzero(pred & label))
    return _overlap_score(2 * tp, float(pred.sum() + label.sum()), bool(pred.any()), bool(label.any()))


def iou(pred: np.ndarray, label: np.ndarray) -> float:
    """|P & L| / |P | L| of two boolean masks (1 when both are empty)."""
    tp = float(np.count_nonzero(pred & label))
    return _overlap_score(tp, float(np.count_nonzero(pred | label)), bool(pred.any()), bool(label.any()))


def cldice(pred: np.ndarray, label: np.ndarray) -> float:
    """Centreline Dice of two boolean masks (module docstring; 1 when both are empty)."""
    if not pred.any() or not label.any():
        return _overlap_score(0.0, 1.0, bool(pred.any()), bool(label.any()))
    skel_pred = skeletonize(pred)
    skel_label = skeletonize(label)
    t_prec = np.count_nonzero(skel_pred & label) / max(1, int(np.count_nonzero(skel_pred)))
    t_sens = np.count_nonzero(skel_label & pred) / max(1, int(np.count_nonzero(skel_label)))
    if t_prec + t_sens == 0:
        return 0.0
    return float(2 * t_prec * t_sens / (t_prec + t_sens))


def boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of a boolean mask with a 4-neighbour outside it (beyond the image counts as outside)."""
    cross = ndimage.generate_binary_structure(2, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=cross, border_value=0)


def nsd(pred: np.ndarray, label: np.ndarray, tolerance_px: float = NSD_TOLERANCE_PX) -> float:
    """Normalised surface Dice of two boolean masks at `tolerance_px` (module docstring)."""
    if not pred.any() or not label.any():
        return _overlap_score(0.0, 1.0, bool(pred.any()), bool(label.any()))
    b_pred, b_label = boundary(pred), boundary(label)
    # distance from every pixel to the nearest boundary pixel of the other mask
    to_label = ndimage.distance_transform_edt(~b_label)
    to_pred = ndimage.distance_transform_edt(~b_pred)
    close_pred = np.count_nonzero(to_label[b_pred] <= tolerance_px)
    close_label = np.count_nonzero(to_pred[b_label] <= tolerance_px)
    return float((close_pred + close_label) / (np.count_nonzero(b_pred) + np.count_nonzero(b_label)))


def auc(scores: np.ndarray, label: np.ndarray) -> float | None:
    """ROC AUC of 1-D scores against 1-D boolean labels (Mann-Whitney U, ties averaged); None unless both
    classes are present."""
    num_pos = int(np.count_nonzero(label))
    num_neg = int(label.size - num_pos)
    if num_pos == 0 or num_neg == 0:
        return None
    ranks = rankdata(scores, method="average")
    rank_sum_pos = float(ranks[label].sum())
    return (rank_sum_pos - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


def case_metrics(
    pred: np.ndarray, label: np.ndarray, fov: np.ndarray | None = None, prob: np.ndarray | None = None
) -> dict[str, float | None]:
    """Every metric of METRICS for one case, inside the FOV (auc only when `prob` is given)."""
    label_b = _binary("label", label)
    pred_b = _binary("prediction", pred, label_b.shape)
    inside = np.ones(label_b.shape, bool) if fov is None else _binary("fov", fov, label_b.shape)
    if not inside.any():
        raise ValueError("fov: the field of view is empty, so there is nothing to score")
    pred_b = pred_b & inside
    label_b = label_b & inside
    tp = int(np.count_nonzero(pred_b & label_b))
    fp = int(np.count_nonzero(pred_b & ~label_b))
    fn = int(np.count_nonzero(~pred_b & label_b))
    tn = int(np.count_nonzero(inside)) - tp - fp - fn
    scores: dict[str, float | None] = {
        "dice": dice(pred_b, label_b),
        "iou": iou(pred_b, label_b),
        "cldice": cldice(pred_b, label_b),
        "nsd": nsd(pred_b, label_b),
        "auc": None,
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
    }
    if prob is not None:
        if not isinstance(prob, np.ndarray) or prob.shape != label_b.shape:
            raise ValueError(
                f"probabilities: shape {getattr(prob, 'shape', None)} does not match "
                f"the label's {label_b.shape}"
            )
        scores["auc"] = auc(prob[inside].astype(np.float64), label_b[inside])
    return scores


def summarise(per_case: list[dict[str, float | None]]) -> dict[str, dict[str, float | int | None]]:
    """Per metric: mean, std (population), min, max and n over the cases where it is defined."""
    out: dict[str, dict[str, float | int | None]] = {}
    for name in METRICS:
        values = np.array([c[name] for c in per_case if c.get(name) is not None], np.float64)
        if values.size == 0:
            out[name] = {"mean": None, "std": None, "min": None, "max": None, "n": 0}
            continue
        out[name] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "min": float(values.min()),
            "max": float(values.max()),
            "n": int(values.size),
        }
    return out

"""The field of view of an image, estimated from the image alone, for tasks that give none.

Many vessel images hold a region that is not part of the picture: the dark outside of an X-ray
collimator or image intensifier, the black corners around a fundus camera's round field, the outside of
an ultrasound sector; and, in images shown inverted or padded white, a white one. A task may give it as a
FOV mask; most do not. Fine-tuned on shots without such a region, a segmenter can mark the edge of a dark
outside as vessel, and where vessels are bright, a white outside itself (BENCHMARKS.md, "The field of view
from the image" and "A white outside"), so its masks are cleared there.

    field_HW = estimate_field(image)          # bool HxW, False outside the field
    keeps, worst = shots_keep_vessels(shots)  # is the estimate safe on this task's labelled shots?
    decision = decide("auto", shots)          # the record a segmenter keeps: {"rule", "used", ...}

The outside is what is dark, flat and joined to the image border, or bright, flat and joined to it:
1. grey = the brightest channel (a fundus image's outside is black in all three), median-filtered (5 px);
2. dark: below `dark_fraction` of the grey's 75th percentile (the field's own brightness, since an outside
   rarely covers a quarter of an image); flat: a local standard deviation (7 px box) below `flat_fraction`
   of that same level (at least one grey level), so anatomy that is only dark, with texture and vessels in
   it, stays inside;
3. the components of (dark and flat) that touch the border and cover at least `min_area` of the image;
4. grown by up to `edge_px` pixels over dark pixels only, to take in the soft edge band where that
   marking happens, without reaching into the brighter field;
5. a white outside: steps 1-4 on the negative of the darkest channel (white is white in every channel, so a
   fundus image's saturated red stays in), taken from its maximum: pixels within `dark_fraction` of the
   field's distance below the image's brightest value, and as flat. Bright, flat regions joined to the
   border that are part of the picture (an X-ray's lung fields burnt out to white) go with it; on
   CIMAT_XCA80 none holds a labelled vessel, and the shot check below stops the estimate where one does.

Whether a task uses it is decided on its shots, never on test labels: `shots_keep_vessels` checks that the
estimate keeps (almost) every labelled vessel pixel of every shot. Dark vessels inside a dark, flat region
joined to the border would fail that check, and the estimate is then not used for the task. A segmenter
makes that decision once, before it trains (`decide`), and every probability map it is judged or taught
by afterwards is cleared with it: its self-training's pseudo-labels and their threshold, the threshold
tuned on the shots, the area threshold, the scored masks and `univg segment`'s outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

DARK_FRACTION = 0.2  # darker than this fraction of the field's level (its 75th percentile) is "dark"
FLAT_FRACTION = 0.02  # local std below this fraction of the field's level is "flat"
MIN_AREA = 0.005  # an outside component covers at least this fraction of the image
EDGE_PX = 4  # the outside grows over dark pixels by up to this many pixels
MAX_SHOT_LOSS = 0.005  # the largest fraction of a shot's vessel pixels the estimate may put outside
_LEVEL_PERCENTILE = 75.0
_MEDIAN_PX = 5
_STD_PX = 7


def _grey(image: np.ndarray, darkest: bool = False) -> np.ndarray:
    """uint8 HxW: the brightest channel (the darkest with `darkest`), scaled to 0..255 by the image's
    maximum when the image is not 8-bit."""
    if image.ndim not in (2, 3):
        raise ValueError(f"estimate_field needs an HxW or HxWxC image, got shape {image.shape}")
    top = float(image.max()) if image.size else 0.0
    if image.ndim == 3:
        image = image.min(axis=2) if darkest else image.max(axis=2)
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    grey = image.astype(np.float32)
    if top > 0:
        grey = grey * (255.0 / top)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def estimate_field(
    image: np.ndarray,
    dark_fraction: float = DARK_FRACTION,
    flat_fraction: float = FLAT_FRACTION,
    min_area: float = MIN_AREA,
    edge_px: int = EDGE_PX,
    bright: bool = True,
) -> np.ndarray:
    """bool HxW, True inside the field of view, False on the dark or bright flat outside joined to the
    border (module docstring); all True when the image has no such outside. bright=False looks for a
    dark outside only."""
    grey = _grey(image)
    outside = _flat_outside(grey, dark_fraction, flat_fraction, min_area, edge_px)
    if bright:  # the same steps on the negative of the darkest channel, taken from its maximum
        if image.ndim == 3:  # one channel is its own darkest: no second conversion
            grey = _grey(image, darkest=True)
        negative = np.subtract(grey.max(initial=0), grey, dtype=np.uint8)
        outside |= _flat_outside(negative, dark_fraction, flat_fraction, min_area, edge_px)
    return ~outside


def _flat_outside(
    depth: np.ndarray, low_fraction: float, flat_fraction: float, min_area: float, edge_px: int
) -> np.ndarray:
    """bool HxW: steps 2-4 of the module docstring on a uint8 map whose outside is low (the grey for a dark
    outside, a negative for a bright one); all False when there is none."""
    grey = cv2.medianBlur(depth, _MEDIAN_PX).astype(np.float32)
    height, width = grey.shape
    none = np.zeros((height, width), bool)
    level = float(np.percentile(grey, _LEVEL_PERCENTILE))
    if level <= 0:  # mostly at this extreme: no field level to measure an outside against
        return none
    mean = cv2.blur(grey, (_STD_PX, _STD_PX))
    std = np.sqrt(np.maximum(cv2.blur(grey * grey, (_STD_PX, _STD_PX)) - mean * mean, 0.0))
    low = grey <= low_fraction * level
    seed = low & (std <= max(flat_fraction * level, 1.0))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(seed.astype(np.uint8), connectivity=8)
    if count <= 1:
        return none
    on_border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    big = stats[:, cv2.CC_STAT_AREA] >= min_area * height * width
    keep = [int(i) for i in on_border if i != 0 and big[i]]
    if not keep:
        return none
    outside = np.isin(labels, keep)
    cross = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    for _ in range(edge_px):
        grown = cv2.dilate(outside.astype(np.uint8), cross) > 0
        outside = outside | (grown & low)
    return outside


def shot_loss(image: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the mask's vessel pixels that estimate_field(image) puts outside the field."""
    vessel = mask > 0
    total = int(vessel.sum())
    if total == 0:
        return 0.0
    return float((vessel & ~estimate_field(image)).sum() / total)


def shots_keep_vessels(
    shots: Sequence[tuple[np.ndarray, np.ndarray]], max_loss: float = MAX_SHOT_LOSS
) -> tuple[bool, float]:
    """(whether every shot keeps all but at most max_loss of its vessel pixels inside the estimated field,
    the largest loss over the shots) for (image, mask) pairs."""
    if not shots:
        raise ValueError("shots_keep_vessels needs at least one (image, mask) pair")
    worst = max(shot_loss(image, mask) for image, mask in shots)
    return worst <= max_loss, worst


def clear_outside(prob_HW: np.ndarray, image: np.ndarray) -> np.ndarray:
    """prob_HW with 0 outside estimate_field(image) (a new array; the image's size)."""
    if prob_HW.shape != image.shape[:2]:
        raise ValueError(f"probability map {prob_HW.shape} and image {image.shape[:2]} differ in size")
    return np.where(estimate_field(image), prob_HW, np.zeros((), prob_HW.dtype))


RULES = ("auto", "always", "never")  # segmenter.infer.field_from_image


def decide(rule: str, shots: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Whether a segmenter trained on these (image, mask) shots clears its outputs outside the field
    estimated from each image, under `rule` (RULES): its record entry {rule, used, worst_shot_loss, why}.
    "auto" uses the estimate when every shot keeps its vessels inside it (shots_keep_vessels), and not at
    all when there is no labelled shot to check it on."""
    if rule not in RULES:
        raise ValueError(f"field_from_image: {rule!r} is not one of {', '.join(RULES)}")
    keeps, worst = shots_keep_vessels(shots) if shots else (False, 0.0)
    used = rule == "always" or (rule == "auto" and keeps)
    if rule == "auto" and not shots:
        why = "not used: no labelled shot to check the estimate on"
    elif rule == "auto":
        why = (
            f"{'used' if keeps else 'not used'}: the estimate puts at most {100 * worst:.2f} % of a shot's "
            f"vessel pixels outside ({'within' if keeps else 'over'} {100 * MAX_SHOT_LOSS:.1f} %)"
        )
    else:
        why = f"{'used' if used else 'not used'} (field_from_image={rule})"
    return {"rule": rule, "used": used, "worst_shot_loss": round(worst, 6), "why": why}

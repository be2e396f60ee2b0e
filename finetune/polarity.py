"""Which way round a task's images go into a pretrained start: as they are, or inverted.

A segmenter pretrained on the engine corpus has seen each modality in one polarity: dark vessels in fundus,
X-ray angiography and DSA, bright ones in OCTA and MRA. A new task may show its vessels the other way round
(an angiogram exported inverted, a fluorescein angiogram's bright vessels on a fundus), and the start then
reads its shots poorly: 0.01-0.04 Dice on CHASE_DB1 made into a fluorescein-like angiogram, where it reads
the same shots inverted at 0.64-0.72 (BENCHMARKS.md, "Vessel polarity from the shots"). Fine-tuning mostly
learns the polarity back by itself, so the measured gain is small (+0.3 to +0.8 Dice points on X-ray
angiography shown inverted, +0.04 and +0.08 on that angiogram), but it is free and the start then begins
from what it knows.

The network input is each channel z-scored (finetune.sampler.prepare_image), so an inverted image's input is
the negative of the image's own (to float rounding). Inverting a task therefore costs nothing: its prepared
inputs (shots, their synthetic pairs, unlabelled and scored images) are multiplied by -1; the corpus pairs
rehearsed beside them keep the polarity the start learned them in.

    choice = decide("auto", shots, predict)   # {"rule", "inverted", "dice_as_is", "dice_inverted", "why"}

`predict(image, inverted)` is the pretrained start's probability map for one shot image, fed as it is or
inverted. Under "auto" the task is inverted only when the start's Dice on the shots (their pixels pooled, at
the threshold best for each way round) is higher inverted by more than MARGIN: the decision reads the shots'
labels only, never a test label, and a task the start already reads the right way round is left exactly as
it was. Without a pretrained start there is nothing to match and the images go in as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

RULES = ("auto", "as_is", "inverted")  # segmenter.input.polarity
MARGIN = 0.05  # the start's Dice on the shots must gain more than this inverted for "auto" to invert


def decide(
    rule: str,
    shots: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    predict: Callable[[np.ndarray, bool], np.ndarray] | None,
) -> dict[str, Any]:
    """The record entry {rule, inverted, dice_as_is, dice_inverted, why} for a segmenter trained on these
    (image, mask, fov or None) shots, under `rule` (RULES). `predict` is the pretrained start (None when
    training starts from random weights); it is called only under "auto"."""
    from finetune.segmenter import choose_threshold

    if rule not in RULES:
        raise ValueError(f"input.polarity: {rule!r} is not one of {', '.join(RULES)}")
    record: dict[str, Any] = {
        "rule": rule,
        "inverted": rule == "inverted",
        "dice_as_is": None,
        "dice_inverted": None,
    }
    if rule != "auto":
        way = "inverted" if rule == "inverted" else "as they are"
        record["why"] = f"images {way} (input.polarity={rule})"
        return record
    if predict is None or not shots:
        missing = "no pretrained start" if predict is None else "no labelled shot"
        record["why"] = f"images as they are: {missing} to match the polarity to"
        return record
    labels = [mask for _image, mask, _fov in shots]
    fovs = [fov for _image, _mask, fov in shots]
    dice = {
        inverted: choose_threshold([predict(image, inverted) for image, _m, _f in shots], labels, fovs)[1]
        for inverted in (False, True)
    }
    record.update(dice_as_is=round(dice[False], 4), dice_inverted=round(dice[True], 4))
    record["inverted"] = dice[True] > dice[False] + MARGIN
    record["why"] = (
        f"images {'inverted' if record['inverted'] else 'as they are'}: the pretrained start's Dice on the "
        f"shots is {dice[False]:.4f} as they are, {dice[True]:.4f} inverted (inverted when higher by more "
        f"than {MARGIN})"
    )
    return record

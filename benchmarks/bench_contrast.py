"""Do few-shot models lose on the test images whose vessels stand out less than the shots'? Dice by group.

    python benchmarks/bench_contrast.py --set CIMAT_XCA80 \
        zoom=runs/x3/CIMAT_XCA80/shots_3/draw_0/univg 'old=runs/x3s_old*/CIMAT_XCA80/shots_3/draw_0/univg'

The network sees each image z-scored over the whole image (finetune.sampler.prepare_image). An image with a
wide dynamic range (a dark collimator edge, a bright catheter, strong exposure gradients) is compressed by
that, so its vessels stand out by fewer standard units than in an evenly lit image. This measures, for every
case of the set, the vessels' contrast in the network's input: the mean of a 4 px ring around the labelled
vessels minus the mean inside them, in the image's standard units, unsigned (vessels darker or brighter
than their surroundings alike). The test cases are split at half the shots' mean contrast: "fainter" (below)
and "like the shots". For each named group of finished `univg finetune` method folders (glob patterns;
several folders, e.g. training seeds, are averaged per case), it prints the mean test Dice over all test cases
and over each group, from the folders' `eval/cases.csv`. The shots are read from the folders'
`../split.json`, which must all name the same shots. Labels are read for grouping only.

`--errors` adds, per model group and contrast group, what kind of pixels the errors are, pooled over the
folders' saved predictions (`eval/pred/<case>.png`) and the group's cases, inside the FOV where there is one:
the share of labelled vessel found on thin vessels (local radius <= THIN_RADIUS_PX, read from the label's
distance transform) and on wider ones, and the predicted vessel pixels outside the label within RIM_PX of it
(a rim too wide) and farther (false vessels: a collimator's dark outside, a catheter), each per labelled
vessel pixel.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from data_engine.ingest import load_case, read_task  # noqa: E402
from finetune.evaluate import match_predictions, read_prediction  # noqa: E402
from finetune.sampler import prepare_image  # noqa: E402

RING_PX = 4
THIN_RADIUS_PX = 2.0  # a labelled pixel within 2 px of a vessel whose centre is at most this deep is "thin"
RIM_PX = 2.0  # a false positive at most this far from a labelled vessel is a rim, farther a false vessel


def vessel_contrast(image: np.ndarray, label: np.ndarray) -> float:
    """Unsigned mean contrast of the labelled vessels against a RING_PX ring around them, in the standard
    units of the network's input (first channel; grey images have three equal ones)."""
    z = prepare_image(image)[0]
    vessel = label > 0
    if not vessel.any():
        return float("nan")
    kernel = np.ones((2 * RING_PX + 1, 2 * RING_PX + 1), np.uint8)
    ring = cv2.dilate(vessel.astype(np.uint8), kernel).astype(bool) & ~vessel
    return abs(float(z[ring].mean()) - float(z[vessel].mean()))


def dice_per_case(folders: list[Path]) -> dict[str, float]:
    """Mean Dice per case over the folders' eval/cases.csv."""
    per_case: dict[str, list[float]] = {}
    for folder in folders:
        with open(folder / "eval" / "cases.csv", newline="") as f:
            for row in csv.DictReader(f):
                per_case.setdefault(row["case"], []).append(float(row["dice"]))
    return {case: float(np.mean(values)) for case, values in per_case.items()}


def error_kinds(pred: np.ndarray, label: np.ndarray, fov: np.ndarray | None) -> np.ndarray:
    """Pixel counts [thin found, thin, wide found, wide, false rim, false far] of one prediction."""
    vessel = label > 0
    inside = np.ones_like(vessel) if fov is None else fov > 0
    depth = cv2.distanceTransform(vessel.astype(np.uint8), cv2.DIST_L2, 3)
    # A pixel's calibre: the deepest vessel pixel within 2 px of it (the centreline's depth, for rim pixels).
    calibre = cv2.dilate(depth, np.ones((5, 5), np.uint8))
    thin = vessel & (calibre <= THIN_RADIUS_PX) & inside
    wide = vessel & ~thin & inside
    away = cv2.distanceTransform((~vessel).astype(np.uint8), cv2.DIST_L2, 3)
    false = pred & ~vessel & inside
    return np.array(
        [(pred & thin).sum(), thin.sum(), (pred & wide).sum(), wide.sum(), (false & (away <= RIM_PX)).sum()]
        + [(false & (away > RIM_PX)).sum()],
        np.float64,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--set", required=True, help="a set folder in ../shared/data")
    parser.add_argument(
        "groups", nargs="+", help="label=glob of univg finetune method folders (a label may repeat)"
    )
    parser.add_argument(
        "--errors", action="store_true", help="also the kinds of error per group, from eval/pred (docstring)"
    )
    args = parser.parse_args()
    if not (DATA / args.set / "pairs.csv").is_file():
        print(f"skipped: no {args.set} in {DATA}")
        return 0
    groups: dict[str, list[Path]] = {}
    for item in args.groups:
        label, sep, pattern = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: expected label=glob")
        folders = [Path(p) for p in sorted(glob.glob(pattern)) if (Path(p) / "eval" / "cases.csv").is_file()]
        if not folders:
            parser.error(f"{item!r}: no finished method folder (with eval/cases.csv) matches")
        groups.setdefault(label, []).extend(folders)  # a label given twice gathers both patterns
    splits = {
        json.dumps(json.loads((f.parent / "split.json").read_text())["train"])
        for fs in groups.values()
        for f in fs
    }
    if len(splits) != 1:
        parser.error(f"the folders were drawn with different shots: {sorted(splits)}")
    shots = json.loads(splits.pop())
    task = read_task(DATA / args.set / "pairs.csv")
    contrast: dict[str, float] = {}
    labels: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for case in task.cases:
        if case.split == "test" or case.name in shots:
            image, label, fov = load_case(case)
            contrast[case.name] = vessel_contrast(image, label)
            if args.errors and case.split == "test":
                labels[case.name] = (label, fov)
    shots_mean = float(np.mean([contrast[s] for s in shots]))
    test = [c.name for c in task.cases if c.split == "test"]
    fainter = [c for c in test if contrast[c] < 0.5 * shots_mean]
    alike = [c for c in test if c not in fainter]

    def mean_of(cases: list[str]) -> float:
        return float(np.mean([contrast[c] for c in cases])) if cases else float("nan")

    print(
        f"{args.set}: shots {', '.join(shots)}, vessel contrast "
        + ", ".join(f"{contrast[s]:.2f}" for s in shots)
        + f" (mean {shots_mean:.2f}) | test mean {mean_of(test):.2f}: {len(fainter)} fainter than half the"
        + f" shots' (mean {mean_of(fainter):.2f}), {len(alike)} like the shots (mean {mean_of(alike):.2f})"
    )
    print("| models | n | all test | fainter | like the shots |\n|---|---|---|---|---|")
    for label, folders in groups.items():
        dice = dice_per_case(folders)
        cells = [
            np.mean([dice[c] for c in cases]) if cases else float("nan") for cases in (test, fainter, alike)
        ]
        print(f"| {label} | {len(folders)} | " + " | ".join(f"{v:.4f}" for v in cells) + " |")
    if args.errors:
        print(
            "\n| models | cases | thin vessel found | wider vessel found | false rim / vessel px "
            "| false vessel / vessel px |\n|---|---|---|---|---|---|"
        )
        test_cases = [c for c in task.cases if c.split == "test"]
        for label, folders in groups.items():
            try:  # every test case's saved prediction, as `univg evaluate` reads them
                saved = [match_predictions(folder / "eval" / "pred", test_cases) for folder in folders]
            except (FileNotFoundError, ValueError) as err:
                parser.error(f"{label}: {err} (a run without saved predictions?)")
            for group, cases in (("fainter", fainter), ("like the shots", alike)):
                counts = np.zeros(6)
                for files in saved:
                    for case_name in cases:
                        truth, fov = labels[case_name]
                        counts += error_kinds(read_prediction(files[case_name][0], 0.5)[0], truth, fov)
                vessel_px = max(counts[1] + counts[3], 1.0)
                print(
                    f"| {label} | {group} ({len(cases)}) | {counts[0] / max(counts[1], 1.0):.3f} | "
                    f"{counts[2] / max(counts[3], 1.0):.3f} | {counts[4] / vessel_px:.3f} | "
                    f"{counts[5] / vessel_px:.3f} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

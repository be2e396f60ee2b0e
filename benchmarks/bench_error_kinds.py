"""What kind of errors a segmenter makes on a task's test split: rims, false vessels, misses; and how much a
fixed threshold or dropping small components would change (diagnostics: they read test labels and choose
nothing).

    python benchmarks/bench_error_kinds.py --task ../shared/data/CIMAT_XCA80/pairs.csv \
        runs/full_xca/CIMAT_XCA80/full/full/eval/pred \
        runs/fewshot_seg18k/CIMAT_XCA80/shots_5/draw_*/univg/eval/pred
    python benchmarks/bench_error_kinds.py --task ../shared/data/CIMAT_XCA80/pairs.csv \
        --models runs/fewshot_seg18k/CIMAT_XCA80/shots_5/draw_*/univg/model

Prediction folders (`<case>.png` as `univg finetune` / `univg evaluate` write them, or `<image stem>.png` as
`univg segment` writes them): pixels pooled over the split inside the FOV, true positives, false positives
within `--rim-px` of a labelled vessel (a rim too wide) or farther (a false vessel), and misses; then the
mean per-case Dice after removing predicted 8-connected components smaller than k px, for each k of
`--drop-small`. With `--models` (segmenter folders): the mean per-case Dice at each threshold of
`--thresholds`, beside the model's own. Read-only; prints one line per folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_engine.ingest import load_case, read_task  # noqa: E402
from finetune.evaluate import match_predictions, read_prediction  # noqa: E402
from finetune.metrics import dice  # noqa: E402


def drop_small(pred: np.ndarray, min_px: int) -> np.ndarray:
    """pred without its 8-connected components of fewer than min_px pixels."""
    if min_px <= 0:
        return pred
    _, labels, stats, _ = cv2.connectedComponentsWithStats(pred.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False  # the background
    return np.asarray(keep[labels])


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--task", required=True, help="task manifest CSV or folder")
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--rim-px", type=float, default=2.0, help="false pixels this close to a label are rim"
    )
    parser.add_argument(
        "--drop-small", type=ints, default=[0, 25, 100, 200, 400, 800], help="min component px"
    )
    parser.add_argument(
        "--models", action="store_true", help="the folders are segmenter models: sweep thresholds"
    )
    parser.add_argument("--thresholds", type=floats, default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("folders", nargs="+", type=Path, help="prediction folders (or model folders)")
    args = parser.parse_args()
    task_path = Path(args.task)
    if not task_path.exists():
        print(f"skipped: no task at {task_path}")
        return 0
    cases = read_task(task_path).split(args.split)
    truth: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for case in cases:
        image, label, fov = load_case(case)
        inside = np.ones(label.shape, bool) if fov is None else fov > 0
        truth[case.name] = (image, (label > 0) & inside, inside)
    for folder in args.folders:
        if args.models:
            from finetune.segmenter import Segmenter

            seg = Segmenter.load(folder)
            scores: dict[float, list[float]] = {t: [] for t in args.thresholds}
            for image, label, inside in truth.values():
                prob = seg.predict_proba(image)
                for t in args.thresholds:
                    scores[t].append(dice((prob > t) & inside, label))
            cells = " | ".join(f"{t:g}: {np.mean(v):.4f}" for t, v in scores.items())
            print(f"{folder}: own threshold {seg.threshold:.2f} | Dice at {cells}", flush=True)
            continue
        files = match_predictions(folder, cases)
        tp = fp_rim = fp_far = fn = 0
        dropped: dict[int, list[float]] = {k: [] for k in args.drop_small}
        for case in cases:
            _, label, inside = truth[case.name]
            pred = read_prediction(files[case.name][0], 0.5)[0] & inside
            from_label = cv2.distanceTransform((~label).astype(np.uint8), cv2.DIST_L2, 3)
            false = pred & ~label
            tp += int((pred & label).sum())
            fp_rim += int((false & (from_label <= args.rim_px)).sum())
            fp_far += int((false & (from_label > args.rim_px)).sum())
            fn += int((label & ~pred).sum())
            for k in args.drop_small:
                dropped[k].append(dice(drop_small(pred, k), label))
        pooled = 2 * tp / max(2 * tp + fp_rim + fp_far + fn, 1)
        cells = " | ".join(f"{k}: {np.mean(v):.4f}" for k, v in dropped.items())
        print(
            f"{folder}: pooled Dice {pooled:.4f} | TP {tp} | FP rim {fp_rim} | FP farther {fp_far} | "
            f"FN {fn} | mean Dice after dropping components under k px, k {cells}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

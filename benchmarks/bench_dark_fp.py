"""Where a segmenter's false vessels are: the share that lies on or beside the image's dark regions.

    python benchmarks/bench_dark_fp.py --task ../shared/data/CIMAT_XCA80/pairs.csv \
        runs/fewshot_segpre/CIMAT_XCA80/shots_1/draw_2/univg/eval/pred

For each folder of predicted masks (`<case>.png`, as `univg evaluate` / `univg finetune` write them, or
`<image stem>.png`, as `univg segment` writes them), over the task's test split: vessel pixels found (TP),
false (FP) and missed (FN), pixel-pooled Dice, and how many of the false ones lie within `--band-px` of a
dark region (9x9 mean grey level below `--dark-level`): the outside of an X-ray collimator or of a field
of view that the task gives no FOV mask for. Read-only; prints one line per folder.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--task", required=True, help="task manifest CSV or folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--dark-level", type=float, default=45.0, help="dark below this grey level")
    parser.add_argument("--band-px", type=int, default=12, help="px from dark counted as on it")
    parser.add_argument("pred", nargs="+", type=Path, help="folders of predicted masks")
    args = parser.parse_args()
    task_path = Path(args.task)
    if not task_path.exists():
        print(f"skipped: no task at {task_path}")
        return 0
    cases = read_task(task_path).split(args.split)
    kernel = np.ones((2 * args.band_px + 1, 2 * args.band_px + 1), np.uint8)
    for folder in args.pred:
        tp = fp = fn = fp_dark = 0
        files = match_predictions(folder, cases)
        for case in cases:
            pred, _prob = read_prediction(files[case.name][0], 0.5)
            image, label, fov = load_case(case)
            grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
            dark = (cv2.blur(grey, (9, 9)) < args.dark_level).astype(np.uint8)
            near_dark = cv2.dilate(dark, kernel) > 0
            inside = np.ones(label.shape, bool) if fov is None else fov > 0
            found, truth = pred & inside, (label > 0) & inside
            false = found & ~truth
            tp += int((found & truth).sum())
            fp += int(false.sum())
            fn += int((truth & ~found).sum())
            fp_dark += int((false & near_dark).sum())
        dice = 2 * tp / max(2 * tp + fp + fn, 1)
        print(
            f"{folder}: TP {tp} | FP {fp} | FN {fn} | pooled Dice {dice:.4f} | FP on or beside dark regions "
            f"{fp_dark} ({fp_dark / max(fp, 1):.0%})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Zero-shot Dice of a segmenter on the real sets: no real label seen, threshold fixed (0.5 by default).

    python benchmarks/bench_zeroshot.py --model weights/segmenter-univg58k-cpu-fast

Meant for a segmenter pretrained on the engine corpus alone (`univg segmenter-pretrain`): how far the
synthetic pairs get before any shot. Scores each set's test split from ../shared/data (skips sets that are
absent) inside the FOV where there is one, and prints one line per set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from data_engine.ingest import load_case, read_task  # noqa: E402
from finetune.metrics import case_metrics  # noqa: E402
from finetune.segmenter import Segmenter  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", required=True, help="a segmenter folder")
    parser.add_argument("--sets", default="CHASE_DB1,CIMAT_XCA80,OCTA500_3M")
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    seg = Segmenter.load(args.model)
    print(f"model {args.model}: {seg.record.get('pretrained_on', 'trained on')} | threshold {args.threshold}")
    for name in args.sets.split(","):
        if not (DATA / name / "pairs.csv").is_file():
            print(f"skipped {name}: no {DATA / name / 'pairs.csv'}")
            continue
        task = read_task(DATA / name / "pairs.csv")
        started = time.perf_counter()
        dice, cldice = [], []
        for case in task.split("test"):
            image, label, fov = load_case(case)
            scores = case_metrics(seg.predict_proba(image) > args.threshold, label, fov, None)
            dice.append(float(scores["dice"] or 0.0))
            cldice.append(float(scores["cldice"] or 0.0))
        print(
            f"{name}: zero-shot Dice {np.mean(dice):.4f} +- {np.std(dice):.4f}, clDice {np.mean(cldice):.4f} "
            f"over {len(dice)} test cases ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

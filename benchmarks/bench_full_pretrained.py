"""Full supervision and the shots-only baseline started from a pretrained segmenter: the references that
`pretrained_segmenter` runs of univg should also be held against (the `full` and `baseline` methods of
`univg finetune` always start from scratch).

    python benchmarks/bench_full_pretrained.py --model runs/seg_univg58k/model --out runs/full_pretrained
    python benchmarks/bench_full_pretrained.py --model runs/seg_univg58k/model --out runs/base_pretrained \
        --baseline-shots 1,5 --draws 3

Per set of ../shared/data (absent ones skipped), the profile's segmenter and budget, the weights of --model
as the start, scored on the test split like `univg finetune` scores. Without --baseline-shots: every train
label (run folder `<out>/<set>/full_pretrained`). With it: the real shots alone, with the standard
augmentation and no synthetic pairs, on the same draws as `univg finetune --shots K` (`<out>/<set>/
baseline_pretrained_shots_<K>/draw_<d>`): what pretraining gives without the engine's synthesis from the
shots. Prints the Dice per run and, for baselines, the mean and std over the draws. Runs resume.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from data_engine.ingest import read_task  # noqa: E402
from finetune.config import load_finetune_config  # noqa: E402
from finetune.run import load_cases, plan_splits, profile_path, train_and_evaluate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", required=True, help="the pretrained segmenter folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sets", default="CHASE_DB1,CIMAT_XCA80,OCTA500_3M")
    parser.add_argument("--profile", default="cpu-fast")
    parser.add_argument("--baseline-shots", default="", help="e.g. 1,5: shots-only baselines instead of full")
    parser.add_argument("--draws", type=int, default=3, help="draws per shot count (with --baseline-shots)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_finetune_config(profile_path(args.profile), [*args.overrides, "split.num_draws=1"])
    init = Path(args.model).resolve()
    shot_counts = [int(k) for k in args.baseline_shots.split(",") if k]
    for name in args.sets.split(","):
        path = DATA / name / "pairs.csv"
        if not path.is_file():
            print(f"skipped {name}: no {path}")
            continue
        task = read_task(path)
        if not shot_counts:
            split = plan_splits(task, path, cfg, None)[0]
            loaded = load_cases(task, set(split.full_train) | set(split.eval), progress=False)
            started = time.perf_counter()
            folder = args.out / name / "full_pretrained"
            info: dict[str, Any] = {"method": "full_pretrained", "task_path": str(path)}
            info["cases_from"] = split.eval_from
            summary = train_and_evaluate(
                cfg, task, loaded, split.full_train, split.eval, None, folder, info, False, init
            )
            print(
                f"{name}: full supervision from {init.name}: Dice {summary['mean']['dice']:.4f} on "
                f"{summary['num_cases']} test cases, {len(split.full_train)} train labels "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            continue
        for shots in shot_counts:
            draws_cfg = replace(cfg, split=replace(cfg.split, shots=shots, num_draws=args.draws))
            splits = plan_splits(task, path, draws_cfg, None)
            loaded = load_cases(task, {n for s in splits for n in s.train + s.eval}, progress=False)
            dice = []
            for d, split in enumerate(splits):
                started = time.perf_counter()
                folder = args.out / name / f"baseline_pretrained_shots_{shots}" / f"draw_{d}"
                info = {
                    "method": "baseline_pretrained",
                    "task_path": str(path),
                    "cases_from": split.eval_from,
                    "draw": d,
                    "shots": split.train,
                }
                summary = train_and_evaluate(
                    draws_cfg, task, loaded, split.train, split.eval, None, folder, info, False, init
                )
                dice.append(summary["mean"]["dice"])
                print(
                    f"{name} {shots} shot(s) draw {d} ({', '.join(split.train)}): baseline from "
                    f"{init.name}: Dice {dice[-1]:.4f} ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
            print(
                f"{name} {shots} shot(s): baseline from {init.name}: Dice {np.mean(dice):.4f} +- "
                f"{np.std(dice):.4f} over {len(dice)} draws",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

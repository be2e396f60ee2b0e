"""Few-shot segmenter on a real task, real images only: draw a split, train, predict the eval cases, score.

    .venv/bin/python benchmarks/bench_segmenter.py --task ../shared/data/CHASE_DB1/pairs.csv \\
        --config configs/finetune/cpu-fast.yaml --out runs/bench_chase [--full] [segmenter.optim.max_steps=N]

Prints the mean Dice / clDice / NSD / AUC of the eval cases and the wall time of training and of
prediction, with the command that made them. `--full` trains on every train case (the full-supervision
upper bound) instead of the drawn shots. The run folder gets split.json, model/ and evaluation/.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_engine.ingest import Case, load_case, read_task  # noqa: E402
from finetune.config import load_finetune_config  # noqa: E402
from finetune.evaluate import evaluate_cases, prepare_out_dir  # noqa: E402
from finetune.segmenter import train_segmenter  # noqa: E402
from finetune.split import draw_split, write_split  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", required=True, help="task manifest CSV or folder")
    parser.add_argument("--config", default="configs/finetune/cpu-fast.yaml")
    parser.add_argument("--out", required=True, help="run folder (must not hold an evaluation yet)")
    parser.add_argument("--full", action="store_true", help="train on every train case instead of the shots")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cfg = load_finetune_config(args.config, args.overrides)
    task = read_task(args.task)
    out = Path(args.out)
    split = write_split(draw_split(task, cfg.split.shots, cfg.split.seed, task_path=args.task), out)
    by_name = {c.name: c for c in task.cases}
    train_names = split.full_train if args.full else split.train
    started = time.perf_counter()
    real = [load_case(by_name[n]) for n in train_names]
    segmenter = train_segmenter(cfg.segmenter, real, model_dir=out / "model")
    train_s = time.perf_counter() - started

    def predict(case: Case, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        prob = segmenter.predict_proba(image)
        return prob > segmenter.threshold, prob

    started = time.perf_counter()
    eval_cases = [by_name[n] for n in split.eval]
    info = {"predictions": f"in memory: {out / 'model'}", "cases_from": split.eval_from,
            "threshold": segmenter.threshold}  # fmt: skip
    summary = evaluate_cases(task, eval_cases, predict, prepare_out_dir(out / "evaluation", False), info)
    predict_s = time.perf_counter() - started

    mean = summary["mean"]
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"{task.name} | {len(real)} real training case(s) | {cfg.segmenter.net.arch} | "
        f"{segmenter.record['steps']} steps | threshold {segmenter.threshold:.2f}"
    )
    print(
        f"eval {summary['num_cases']} case(s): dice {mean['dice']:.4f} | cldice {mean['cldice']:.4f} | "
        f"nsd {mean['nsd']:.4f} | auc {mean['auc']:.4f}"
    )
    print(f"wall: train {train_s:.0f} s (incl. threshold tuning) | predict + score {predict_s:.0f} s")


if __name__ == "__main__":
    main()

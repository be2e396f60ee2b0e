"""Full supervision started from a pretrained segmenter: the reference that `pretrained_segmenter` runs of
univg should also be held against (the `full` method of `univg finetune` always starts from scratch).

    python benchmarks/bench_full_pretrained.py --model runs/seg_univg58k/model --out runs/full_pretrained

Per set of ../shared/data (absent ones skipped): every train label, the profile's segmenter and budget, the
weights of --model as the start, scored on the test split like `univg finetune` scores (run folder
`<out>/<set>/full_pretrained` with model/ and eval/). Prints the Dice per set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

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
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_finetune_config(profile_path(args.profile), [*args.overrides, "split.num_draws=1"])
    init = Path(args.model).resolve()
    for name in args.sets.split(","):
        path = DATA / name / "pairs.csv"
        if not path.is_file():
            print(f"skipped {name}: no {path}")
            continue
        task = read_task(path)
        split = plan_splits(task, path, cfg, None)[0]
        loaded = load_cases(task, set(split.full_train) | set(split.eval), progress=False)
        started = time.perf_counter()
        folder = args.out / name / "full_pretrained"
        info = {"method": "full_pretrained", "task_path": str(path), "cases_from": split.eval_from}
        summary = train_and_evaluate(
            cfg, task, loaded, split.full_train, split.eval, None, folder, info, False, init
        )
        print(
            f"{name}: full supervision from {init.name}: Dice {summary['mean']['dice']:.4f} on "
            f"{summary['num_cases']} test cases, {len(split.full_train)} train labels "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

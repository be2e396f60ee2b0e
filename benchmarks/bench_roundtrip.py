"""Mask -> vessel graph -> mask on the real sets: Dice, and whether the graph keeps the vessels' width.

    .venv/bin/python benchmarks/bench_roundtrip.py [--sets CHASE_DB1,CIMAT_XCA80,OCTA500_3M] [--limit N]

For every labelled case of each task in ../shared/data: `decompose` the mask, `render_mask` the graph
back, and compare. `area` is rendered / labelled vessel pixels (1.0: no width bias; the synthetic pairs'
masks are drawn from graphs, so a bias here would teach a segmenter wider or thinner vessels than the
labels), `extra` and `missing` the pixels gained and lost, each over the labelled area. Skips with a message
when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_engine.graph import decompose, render_mask  # noqa: E402
from data_engine.ingest import read_task  # noqa: E402
from data_engine.io import read_mask  # noqa: E402
from finetune.metrics import dice as dice_of  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sets", default="CHASE_DB1,CIMAT_XCA80,OCTA500_3M")
    parser.add_argument("--limit", type=int, default=0, help="at most N cases per set (0: all)")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: no real data in {DATA}")
        return 0
    print("| set | cases | Dice mean (min) | area rendered / labelled | extra | missing | s per case |")
    print("|---|---|---|---|---|---|---|")
    for name in args.sets.split(","):
        task = read_task(DATA / name / "pairs.csv")
        cases = task.cases[: args.limit] if args.limit else task.cases
        dice, area, extra, missing = [], [], [], []
        started = time.perf_counter()
        for case in tqdm(cases, desc=name, leave=False):
            label = read_mask(case.mask_path) > 0
            drawn = render_mask(decompose(label.astype(np.uint8) * 255), label.shape)[0] > 0
            n = label.sum()
            dice.append(dice_of(drawn, label))
            area.append(drawn.sum() / n)
            extra.append((drawn & ~label).sum() / n)
            missing.append((label & ~drawn).sum() / n)
        per_case = (time.perf_counter() - started) / len(cases)
        print(
            f"| {name} | {len(cases)} | {np.mean(dice):.4f} ({np.min(dice):.4f}) | {np.mean(area):.3f} | "
            f"{np.mean(extra):.3f} | {np.mean(missing):.3f} | {per_case:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Would dropping small predicted components help? A rule read from the shots' labels, re-scored post hoc.

    python benchmarks/bench_components.py runs/bench_fewshot [--max-label-loss 0.01]

For every saved prediction of a `bench_fewshot.py` output (`<set>/shots_<k>/draw_<d>/<method>/eval/pred`
and `<set>/full*/full/eval/pred`), removes the predicted 8-connected components smaller than a size read
from the training labels alone, keeps each image's largest component whatever its size, and re-scores
the test cases (mean Dice inside each FOV). The size: the largest k such that the labelled components
smaller than k hold at most `--max-label-loss` of the training labels' vessel pixels (the shots' for
univg and the baseline, every train label for full supervision), so specks in a label do not set it.

X-ray angiography labels are single trees, and univg's false vessels there are mostly detached pieces
(BENCHMARKS.md, "Where X-ray angiography's 5-shot univg loses"): this measures whether the labels' own
component sizes say which pieces to drop. No test label is read to choose anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from data_engine.ingest import Task, load_case, read_task  # noqa: E402
from finetune.metrics import dice  # noqa: E402
from finetune.run import machine_line, machine_record  # noqa: E402
from finetune.split import read_split  # noqa: E402


def component_sizes(mask: np.ndarray) -> np.ndarray:
    """Pixel counts of the 8-connected components of a boolean mask."""
    _n, _labels, stats, _c = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return np.asarray(stats[1:, cv2.CC_STAT_AREA])


def min_component_px(labels: list[np.ndarray], max_label_loss: float) -> int:
    """Largest size k whose smaller labelled components hold at most max_label_loss of the labelled pixels."""
    sizes = np.sort(np.concatenate([component_sizes(m > 0) for m in labels]))
    share = np.cumsum(sizes) / sizes.sum()
    return int(sizes[int(np.argmax(share > max_label_loss))])


def drop_small(pred: np.ndarray, min_px: int) -> np.ndarray:
    """pred without its components smaller than min_px; the largest component always stays."""
    n, labels, stats, _c = cv2.connectedComponentsWithStats(pred.astype(np.uint8), connectivity=8)
    if n <= 2:
        return pred
    area = stats[:, cv2.CC_STAT_AREA].copy()
    area[0] = 0
    keep = area >= min_px
    keep[int(np.argmax(area))] = True
    keep[0] = False
    return np.asarray(keep[labels])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a bench_fewshot.py output folder")
    parser.add_argument("--max-label-loss", type=float, default=0.01, help="share of labelled pixels")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: no real data in {DATA}")
        return 0
    print(f"# bench_components {args.out} | {machine_line(machine_record())}")
    print(f"command: python benchmarks/bench_components.py {' '.join(sys.argv[1:])}")
    cache: dict[tuple[str, str], tuple[np.ndarray, np.ndarray | None]] = {}

    def label(task: Task, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        if (task.name, name) not in cache:
            _image, mask, fov = load_case(next(c for c in task.cases if c.name == name))
            cache[task.name, name] = (mask, fov)
        return cache[task.name, name]

    print("| set | run | method | k (px) | Dice | with the rule | change (points) |")
    print("|---|---|---|---|---|---|---|")
    changes: list[float] = []
    for set_dir in sorted(p for p in args.out.iterdir() if (DATA / p.name / "pairs.csv").is_file()):
        task = read_task(DATA / set_dir.name / "pairs.csv")
        runs: list[tuple[Path, tuple[str, ...]]] = [
            (d, ("univg", "baseline")) for d in sorted(set_dir.glob("shots_*/draw_*"))
        ]
        runs += [(d / "draw_0", ("full",)) for d in sorted(set_dir.glob("full*"))]
        for draw_dir, methods in runs:
            split = read_split(draw_dir / "split.json")
            for method in methods:
                pred_dir = (draw_dir.parent if method == "full" else draw_dir) / method / "eval" / "pred"
                if not pred_dir.is_dir():
                    continue
                trained_on = (
                    [c.name for c in task.cases if c.split == split.pool_split]
                    if method == "full"
                    else split.train
                )
                k = min_component_px([label(task, n)[0] for n in trained_on], args.max_label_loss)
                before, after = [], []
                for name in split.eval:
                    mask, fov = label(task, name)
                    pred = np.asarray(cv2.imread(str(pred_dir / f"{name}.png"), cv2.IMREAD_GRAYSCALE)) > 0
                    inside = np.ones(pred.shape, bool) if fov is None else fov > 0
                    truth = (mask > 0) & inside
                    before.append(dice(pred & inside, truth))
                    after.append(dice(drop_small(pred & inside, k), truth))
                change = 100 * float(np.mean(after) - np.mean(before))
                changes.append(change)
                run_name = draw_dir.parent.name if method == "full" else str(draw_dir.relative_to(set_dir))
                print(
                    f"| {set_dir.name} | {run_name} | {method} | {k} | {np.mean(before):.4f} | "
                    f"{np.mean(after):.4f} | {change:+.2f} |",
                    flush=True,
                )
    if changes:
        gains = sum(c > 0 for c in changes)
        print(f"\n{gains} of {len(changes)} models gain; mean change {np.mean(changes):+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())

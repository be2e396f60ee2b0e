"""A white outside: CIMAT_XCA80 with its collimator's outside made white, two ways, and where runs on them
mark that outside as vessel.

    python benchmarks/bench_outside.py make --out runs/outside     # writes runs/outside/{xca_white,xca_inv}
    univg finetune --task runs/outside/xca_inv/pairs.csv --shots 3 --out runs/inv   # or bench_fewshot --data
    python benchmarks/bench_outside.py score runs/inv [more runs ...]

`make` reads ../shared/data/CIMAT_XCA80 (skips with a message where it is absent) and writes two tasks with
its splits, never into the project (the set's terms allow research use only):
- xca_inv: every image inverted (vessels bright, the collimator's and image intensifier's outside white, as
  an inverted display or export shows them); masks as given;
- xca_white: vessels dark as given, the outside made flat white (245, noise sd 1.5, a 1.5 px soft edge);
  the outside is widened by 4 px over the intensifier's dark edge ring, and labels there are cut alike.
The outside is the dark-outside estimate of the original image (finetune.field.estimate_field with
bright=False), which is the truth here: the derived images are made from it.

`score` reads each run's saved test masks (`draw_*/<method>/eval/pred`) and counts, per draw and method,
false vessel pixels inside that outside, all false vessel pixels, and the Dice the run reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.field import estimate_field  # noqa: E402

SOURCE = ROOT.parent / "shared" / "data" / "CIMAT_XCA80"
WHITE, WHITE_SD, EDGE_SIGMA, RING_PX = 245.0, 1.5, 1.5, 4


def read_grey(path: Path) -> np.ndarray:
    """uint8 HxW, or an error naming the file."""
    array = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if array is None:
        raise SystemExit(f"unreadable: {path}")
    return array


def true_outside(image: np.ndarray) -> np.ndarray:
    """bool HxW: the original image's dark outside (the derived tasks are made from it)."""
    return ~estimate_field(image, bright=False)


def whitened(image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image with its outside flat white, mask cut where the outside grew): the xca_white case."""
    outside = true_outside(image)
    if not outside.any():
        return image, mask
    level = float(np.percentile(image, 75))
    near = cv2.dilate(outside.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (17, 17))) > 0
    outside |= near & (image < 0.6 * level)  # the soft dark rim the estimate leaves
    ring = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * RING_PX + 1, 2 * RING_PX + 1))
    outside = cv2.dilate(outside.astype(np.uint8), ring) > 0  # and the intensifier's edge ring
    alpha = cv2.GaussianBlur(outside.astype(np.float32), (0, 0), EDGE_SIGMA)
    white = WHITE + np.random.default_rng(seed).normal(0.0, WHITE_SD, image.shape)
    out = np.clip(np.rint(alpha * white + (1 - alpha) * image), 0, 255).astype(np.uint8)
    return out, np.where(outside, np.uint8(0), mask)


def make(out: Path) -> int:
    if not (SOURCE / "pairs.csv").is_file():
        print(f"skipped: no {SOURCE / 'pairs.csv'}")
        return 0
    with open(SOURCE / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with_outside = 0
    for k, row in enumerate(rows):
        image, mask = read_grey(SOURCE / row["image"]), read_grey(SOURCE / row["mask"])
        with_outside += int(true_outside(image).any())
        white_image, white_mask = whitened(image, mask, seed=k)
        for task, im, mk in (("xca_inv", 255 - image, mask), ("xca_white", white_image, white_mask)):
            for key, array in (("image", im), ("mask", mk)):
                path = out / task / row[key]
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), array)
    for task in ("xca_inv", "xca_white"):
        with open(out / task / "pairs.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "mask", "fov", "split"])
            writer.writeheader()
            writer.writerows(
                {"image": r["image"], "mask": r["mask"], "fov": "", "split": r["split"]} for r in rows
            )
    print(f"wrote {out}/xca_inv and {out}/xca_white: {len(rows)} cases, {with_outside} with an outside")
    return 0


def score(runs: list[Path]) -> int:
    if not (SOURCE / "pairs.csv").is_file():
        print(f"skipped: no {SOURCE / 'pairs.csv'}")
        return 0
    with open(SOURCE / "pairs.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    outside, label = {}, {}
    for row in rows:
        stem = Path(row["image"]).stem
        outside[stem] = true_outside(read_grey(SOURCE / row["image"]))
        label[stem] = read_grey(SOURCE / row["mask"]) > 0
    print("| run | draw | method | Dice | false vessel px in the outside | false vessel px, all |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        for draw in sorted(run.glob("draw_*")):
            for method_dir in sorted(p for p in draw.iterdir() if (p / "eval" / "pred").is_dir()):
                in_outside = false = 0
                for stem, out in outside.items():
                    found = list((method_dir / "eval" / "pred").glob(f"*_{stem}.png"))
                    if not found:
                        continue
                    pred = read_grey(found[0]) > 0
                    wrong = pred & ~label[stem]
                    in_outside += int((wrong & out).sum())
                    false += int(wrong.sum())
                summary = json.loads((method_dir / "eval" / "summary.json").read_text())
                print(
                    f"| {run} | {draw.name} | {method_dir.name} | {summary['mean']['dice']:.4f} | "
                    f"{in_outside} | {false} |"
                )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    make_p = sub.add_parser("make", help="write the xca_inv and xca_white tasks")
    make_p.add_argument("--out", type=Path, required=True)
    score_p = sub.add_parser("score", help="false vessels in the outside, per run, draw and method")
    score_p.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    return make(args.out) if args.command == "make" else score(args.runs)


if __name__ == "__main__":
    sys.exit(main())

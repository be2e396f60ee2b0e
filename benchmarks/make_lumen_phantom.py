"""A generated stress task: one artery lumen per ultrasound-like frame, with an unlabelled vein beside it.

    python benchmarks/make_lumen_phantom.py --out /tmp/lumen_task
    univg finetune --task /tmp/lumen_task/pairs.csv --shots 5 --out runs/lumen

Not a real set and no stand-in for one: a phantom for two things the three real sets never show. Its
vessels are cut across (a round lumen 30-60 px wide, as a transverse ultrasound frame shows a carotid),
not trees of thin tubes; and beside each labelled artery lies an unlabelled look-alike, a flatter dark vein
without the artery's bright wall, as a task that labels one vessel among several would have. Frames are
360x300 px: echogenic tissue layers, speckle, attenuation with depth; the artery's lumen is anechoic with a
bright wall ring just outside its label. `--num` frames, the first half `train`, the rest `test`, written
as images/, masks/ and a pairs.csv manifest; frame i draws from np.random.default_rng(1000 * seed + i).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np


def frame(rng: np.random.Generator, height: int = 300, width: int = 360) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 HxW, artery mask uint8 HxW {0, 255}) of one frame."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tissue = 0.35 + 0.15 * np.sin(yy / rng.uniform(15, 40) + rng.uniform(0, 6)) + 0.1 * (yy / height)
    art_y, art_x = rng.uniform(110, 200), rng.uniform(90, 270)
    art_r = rng.uniform(16, 30)
    art_d = np.sqrt(((yy - art_y) / (art_r * rng.uniform(0.85, 1.0))) ** 2 + ((xx - art_x) / art_r) ** 2)
    vein_y = art_y - rng.uniform(-20, 30)
    vein_x = art_x + rng.choice([-1.0, 1.0]) * rng.uniform(50, 80)
    vein_r = rng.uniform(14, 28)
    vein_d = np.sqrt(((yy - vein_y) / (vein_r * rng.uniform(0.45, 0.8))) ** 2 + ((xx - vein_x) / vein_r) ** 2)
    echo = tissue.copy()
    echo[art_d < 1.0] = 0.04  # anechoic blood
    echo[vein_d < 1.0] = 0.06
    echo += 0.5 * np.exp(-(((art_d - 1.08) / 0.06) ** 2))  # the artery's wall, outside its label
    speckle = np.abs(rng.normal(size=(height, width)) + 1j * rng.normal(size=(height, width))) / np.sqrt(2)
    speckle = 1.4 * cv2.GaussianBlur(speckle.astype(np.float32), (0, 0), 1.2)
    image = echo * speckle * (1.0 - 0.4 * yy / height)
    return np.clip(image * 255, 0, 255).astype(np.uint8), np.where(art_d < 1.0, 255, 0).astype(np.uint8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="task folder to write (images/, masks/, pairs.csv)")
    parser.add_argument("--num", type=int, default=30, help="frames; the first half train, the rest test")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(args.num):
        image, mask = frame(np.random.default_rng(1000 * args.seed + i))
        name = f"us_{i:02d}"
        cv2.imwrite(str(out / "images" / f"{name}.png"), image)
        cv2.imwrite(str(out / "masks" / f"{name}.png"), mask)
        rows.append((f"images/{name}.png", f"masks/{name}.png", "", "train" if i < args.num // 2 else "test"))
    with open(out / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mask", "fov", "split"])
        writer.writerows(rows)
    print(f"wrote {args.num} frames to {out} ({args.num // 2} train, {args.num - args.num // 2} test)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Milliseconds per `render` call for each built-in modality at 512 px, on one core.

    .venv/bin/python benchmarks/bench_render.py [--size-px 512] [--calls 40]

The corpus budget is <= 4 ms per call on one core (58,689 samples, mask generation and PNG encoding
included, in <= 10 minutes on 2 cores). OpenCV is pinned to one thread so the figure is per core; the
first call per modality (tile building) is excluded, as a corpus worker pays it once.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_engine import MODALITIES  # noqa: E402
from data_engine.render import render  # noqa: E402


def tree_mask(size_px: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A branching tree drawn with cv2 (uint8 {0,255} mask, float32 radius map); vessel share ~8-15 %."""
    mask = np.zeros((size_px, size_px), np.uint8)
    radius_px = np.zeros((size_px, size_px), np.float32)
    stack = [(size_px / 2, size_px * 0.95, -math.pi / 2, size_px * 0.012)]
    segments = []
    while stack:
        x, y, angle, r = stack.pop()
        if r < 0.8:
            continue
        length = r * rng.uniform(8, 14) + 8
        x2, y2 = x + math.cos(angle) * length, y + math.sin(angle) * length
        segments.append((r, (round(x), round(y)), (round(x2), round(y2))))
        child = r * 0.79  # Murray's law for two equal children: r * 2**(-1/3)
        spread = rng.uniform(0.3, 0.7)
        stack += [(x2, y2, angle + spread, child), (x2, y2, angle - spread, child)]
    for r, a, b in sorted(segments):  # thick last, so junctions keep the parent's radius
        thickness = max(1, round(2 * r))
        cv2.line(mask, a, b, 255, thickness)
        cv2.line(radius_px, a, b, float(r), thickness)
    radius_px[mask == 0] = 0
    return mask, radius_px


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-px", type=int, default=512)
    parser.add_argument("--calls", type=int, default=40, help="timed calls per modality")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    masks = [tree_mask(args.size_px, np.random.default_rng([0, k])) for k in range(4)]
    print(f"$ {shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"render at {args.size_px} px, {args.calls} calls per modality, cv2 threads = 1, "
        f"vessel share {np.mean([(m > 0).mean() for m, _ in masks]):.1%}"
    )
    print(f"{'':8s} {'wall':>9s} {'cpu':>9s}   (cpu = process time: what one core spends, less affected by")
    print(f"{'':8s} {'':>9s} {'':>9s}    other jobs on a shared machine)")
    total_wall = total_cpu = 0.0
    for modality in MODALITIES:
        render(modality, *masks[0], np.random.default_rng(0))  # builds this modality's tiles
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(args.calls):
            mask, radius_px = masks[i % len(masks)]
            render(modality, mask, radius_px, np.random.default_rng([1, i]))
        wall_ms = (time.perf_counter() - wall) / args.calls * 1e3
        cpu_ms = (time.process_time() - cpu) / args.calls * 1e3
        total_wall, total_cpu = total_wall + wall_ms, total_cpu + cpu_ms
        print(f"{modality:8s} {wall_ms:6.2f} ms {cpu_ms:6.2f} ms  per call")
    n = len(MODALITIES)
    print(f"{'mean':8s} {total_wall / n:6.2f} ms {total_cpu / n:6.2f} ms  per call (budget 4.00 ms)")


if __name__ == "__main__":
    main()

"""Milliseconds per remove_vessels / measure_profile / draw_vessels on the real sets, and a picture of them.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_composite.py [--shots 5] [--out PICTURE.jpg]

For each real set in ../shared/data (absent ones are skipped): the first `shots` training cases are
measured and their profiles merged; the first case's vessels are removed, and the mask of the second
case, decomposed and mirrored left-right, is drawn into that background. The picture has one row per
set: real image | vessels removed | new mask | composite. OpenCV is pinned to one thread.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_engine.composite import (  # noqa: E402
    clip_to_fov,
    draw_vessels,
    measure_profile,
    merge_profiles,
    remove_vessels,
)
from data_engine.graph import decompose, flip, render_mask  # noqa: E402
from data_engine.ingest import load_case, read_task  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ("CHASE_DB1", "CIMAT_XCA80", "OCTA500_3M")
T = TypeVar("T")
ROW_PX = 300  # height of one picture row; keeps the JPEG well under 300 kB


def _bgr(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """fn(*args) and its wall time in ms."""
    start = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shots", type=int, default=5, help="training cases measured per set")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "composite_examples.jpg"
    )
    args = parser.parse_args()
    cv2.setNumThreads(1)
    print(f"$ {shlex.join([Path(sys.executable).name, *sys.argv])}")
    rows = []
    for name in SETS:
        csv_path = DATA / name / "pairs.csv"
        if not csv_path.is_file():
            print(f"{name}: skipped ({csv_path} not found)")
            continue
        cases = [c for c in read_task(csv_path).cases if c.split == "train"][: max(args.shots, 2)]
        shots = [load_case(c) for c in cases]
        removes, measures, profiles = [], [], []
        for image, mask, fov in shots[: args.shots]:
            background, ms = _timed(remove_vessels, image, mask, fov)
            removes.append(ms)
            profile, ms = _timed(measure_profile, image, mask, fov, background)
            measures.append(ms)
            profiles.append(profile)
        profile = merge_profiles(profiles)
        image, mask, fov = shots[0]
        background = remove_vessels(image, mask, fov)
        h, w = mask.shape
        new_mask, new_radius = render_mask(flip(decompose(shots[1][1]), "x", w), (h, w))
        new_mask, new_radius = clip_to_fov(new_mask, new_radius, fov)
        draws = []
        for k in range(5):
            composite, ms = _timed(
                draw_vessels, background, new_mask, new_radius, profile, np.random.default_rng(k)
            )
            draws.append(ms)
        print(
            f"{name:12s} {w}x{h} {'colour' if image.ndim == 3 else 'grey'}: "
            f"remove {np.median(removes):6.1f} ms"
            f" | measure {np.median(measures):6.1f} ms | draw {np.median(draws):6.1f} ms (medians) | model "
            f"{profile.model} (err log {profile.error_log:.1f}, add {profile.error_add:.1f} grey levels) | "
            f"polarity {profile.polarity:+d} | blur {profile.edge_blur_px:.2f} px | noise "
            f"{np.array2string(profile.noise_std_C, precision=1)}"
        )
        tiles = [_bgr(image), _bgr(background), _bgr(new_mask), _bgr(composite)]
        scale = ROW_PX / h
        rows.append(
            np.hstack(
                [cv2.resize(t, (round(w * scale), ROW_PX), interpolation=cv2.INTER_AREA) for t in tiles]
            )
        )
    if not rows:
        print(f"no real sets found under {DATA}: nothing to time")
        return
    width = max(r.shape[1] for r in rows)
    picture = np.vstack([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), picture, [cv2.IMWRITE_JPEG_QUALITY, 85])
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()

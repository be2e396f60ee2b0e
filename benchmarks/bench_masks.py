"""Milliseconds per `make_mask` call for each mask source and modality at 512 px, on one core; and the
time `build_library` takes.

    .venv/bin/python benchmarks/bench_masks.py [--size-px 512] [--calls 100] [--graphs 24]

The corpus budget is <= 4 ms per mask on average over the sources and modalities (58,689 samples,
rendering and PNG encoding included, in <= 10 minutes on 2 cores). OpenCV is pinned to one thread so
the figures are per core. The first call per modality (mesh tiles, caches) is excluded, as a corpus
worker pays it once. `cpu` is process time: what this process spent, less affected by other jobs on a
shared machine than `wall`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_engine import MODALITIES  # noqa: E402
from data_engine.corpus import EngineConfig, LibraryConfig, SourceMix  # noqa: E402
from data_engine.recombine import SOURCES, build_library, make_mask  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-px", type=int, default=512)
    parser.add_argument("--calls", type=int, default=100, help="timed calls per source and modality")
    parser.add_argument("--graphs", type=int, default=24, help="library graphs per modality")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    cfg = EngineConfig(image_size_px=args.size_px, library=LibraryConfig(num_graphs_per_modality=args.graphs))
    print(f"$ {shlex.join([Path(sys.executable).name, *sys.argv])}")

    wall, cpu = time.perf_counter(), time.process_time()
    library = build_library(cfg)
    lib_wall, lib_cpu = time.perf_counter() - wall, time.process_time() - cpu
    num_graphs = sum(len(v) for v in library.values())
    print(
        f"build_library: {lib_wall:.2f} s wall, {lib_cpu:.2f} s cpu "
        f"({num_graphs} graphs at {args.size_px} px)"
    )
    print(
        f"make_mask at {args.size_px} px, {args.calls} calls per cell, cv2 threads = 1; "
        "ms per call, wall / cpu"
    )
    print(f"{'':8s}" + "".join(f"{s:>18s}" for s in SOURCES) + f"{'mean':>18s}")
    cells: dict[tuple[str, str], tuple[float, float]] = {}
    share = []
    for modality in MODALITIES:
        row = f"{modality:8s}"
        for source in SOURCES:
            make_mask(cfg, modality, source, np.random.default_rng([2, 0]), library)  # warm caches
            wall, cpu = time.perf_counter(), time.process_time()
            vessel = 0.0
            for i in range(args.calls):
                mask, _, _ = make_mask(cfg, modality, source, np.random.default_rng([1, i]), library)
                vessel += float(np.count_nonzero(mask)) / mask.size
            w_ms = (time.perf_counter() - wall) / args.calls * 1e3
            c_ms = (time.process_time() - cpu) / args.calls * 1e3
            cells[(modality, source)] = (w_ms, c_ms)
            share.append(vessel / args.calls)
            row += f"{w_ms:8.2f} /{c_ms:6.2f}  "
        mw = np.mean([cells[(modality, s)][0] for s in SOURCES])
        mc = np.mean([cells[(modality, s)][1] for s in SOURCES])
        print(row + f"{mw:8.2f} /{mc:6.2f}")
    mix = SourceMix()
    weights = {"procedural": mix.procedural, "recombined": mix.recombined, "regrowth": mix.regrowth}
    total = sum(weights.values())
    row = f"{'mean':8s}"
    for source in SOURCES:
        row += f"{np.mean([cells[(m, source)][0] for m in MODALITIES]):8.2f} /"
        row += f"{np.mean([cells[(m, source)][1] for m in MODALITIES]):6.2f}  "
    flat_w = np.mean([v[0] for v in cells.values()])
    flat_c = np.mean([v[1] for v in cells.values()])
    print(row + f"{flat_w:8.2f} /{flat_c:6.2f}")
    mix_w = sum(weights[s] * np.mean([cells[(m, s)][0] for m in MODALITIES]) for s in SOURCES) / total
    mix_c = sum(weights[s] * np.mean([cells[(m, s)][1] for m in MODALITIES]) for s in SOURCES) / total
    print(
        f"corpus mix (sources {mix.procedural}/{mix.recombined}/{mix.regrowth}, modalities equal): "
        f"{mix_w:.2f} ms wall, {mix_c:.2f} ms cpu per mask (budget 4.00 ms); "
        f"mean vessel share {np.mean(share):.1%}"
    )


if __name__ == "__main__":
    main()

"""Shard build throughput beside its floor: the time to only PNG-encode the same images and masks.

    python benchmarks/bench_build.py --num-samples 300 --workers 2

Builds `--num-samples` pairs of configs/corpus/univg58k.yaml (512 px, the real modality and source mix)
with the real `build_corpus`, then, in this same run and on the very samples it built (decoded back from
the shards, one shard at a time), times encoding alone with the same number of processes: the floor a
build cannot beat. The one-process floor and the bytes vs encode and decode time of each PNG strategy and
level use the first `--subset` samples. Also prints the worker time split (make / encode / write), peak RSS
per worker and the full corpus's time at this rate. Memory stays flat, so the whole corpus can be measured:

    python benchmarks/bench_build.py --num-samples 58689 --samples-per-shard 256 --workers 2 --levels ''
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import multiprocessing as mp
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shards.build import build_corpus, format_bytes  # noqa: E402
from shards.config import load_corpus_config  # noqa: E402
from shards.inspect import iter_corpus  # noqa: E402
from shards.manifest import load_manifest  # noqa: E402
from shards.schema import PNG_STRATEGIES, decode_sample, encode_sample, iter_samples_bytes  # noqa: E402


def _init_floor(barrier: Any) -> None:
    global _BARRIER
    _BARRIER = barrier
    cv2.setNumThreads(1)


_BARRIER: Any = None


def _encode_share(args: tuple[Path, list[str], int, str]) -> tuple[int, float]:
    """Encode the samples of some shards, timing the encoding only: each shard is decoded (untimed), then
    its samples are encoded (timed), so memory holds one shard at a time however large the build."""
    folder, names, level, strategy = args
    _BARRIER.wait()  # the processes start together
    count, encode_s = 0, 0.0
    for name in names:
        samples = [
            decode_sample(key, members)
            for key, members in iter_samples_bytes((folder / name).read_bytes(), name)
        ]
        t0 = time.perf_counter()
        for sample in samples:
            encode_sample(sample, level, strategy)
        encode_s += time.perf_counter() - t0
        count += len(samples)
    return count, encode_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/corpus/univg58k.yaml"))
    parser.add_argument("--num-samples", type=int, default=300, help="pairs to build")
    parser.add_argument(
        "--samples-per-shard", type=int, default=50, help="pairs per shard (small: spreads work)"
    )
    parser.add_argument("--workers", type=int, default=2, help="build worker processes")
    parser.add_argument(
        "--levels", default="0,1,3,6,9", help="zlib levels for the bytes/time table ('' skips)"
    )
    parser.add_argument(
        "--png-strategy", default=None, choices=PNG_STRATEGIES, help="build with this (default: the config's)"
    )
    parser.add_argument("--out", default=None, help="corpus folder to build into (default: a temp folder)")
    parser.add_argument(
        "--subset",
        type=int,
        default=600,
        help="samples held in memory for the one-process floor and the level table (the first N built)",
    )
    args = parser.parse_args()

    full_cfg = load_corpus_config(args.config)
    cfg = load_corpus_config(
        args.config,
        [
            f"name=bench{args.num_samples}",
            f"num_samples={args.num_samples}",
            f"samples_per_shard={args.samples_per_shard}",
            *([f"png_strategy={args.png_strategy}"] if args.png_strategy else []),
        ],
    )
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_build_"))
    if out.is_dir() and any(out.iterdir()):
        # a build into a folder holding this corpus keeps its shards and times nothing
        parser.error(f"--out {out} is not empty: the benchmark times a fresh build; give a new or empty one")
    script = os.path.relpath(Path(sys.argv[0]).resolve(), Path.cwd())
    print(f"command: python {shlex.join([script, *sys.argv[1:]])}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, OpenCV {cv2.__version__}; date {datetime.date.today()}"
    )
    print(
        f"corpus: {cfg.num_samples} pairs at {cfg.engine.image_size_px} px, "
        f"png strategy {cfg.png_strategy} level {cfg.png_compression}, {out}"
    )

    result = build_corpus(cfg, out, num_workers=args.workers, overwrite=True, progress=False)
    build_rate = result.num_samples_built / result.build_s
    stage_total = sum(result.stage_s.values())
    make_s = result.stage_s["make"] / result.num_samples_built
    own_s = (result.stage_s["encode"] + result.stage_s["write"]) / result.num_samples_built

    # The floor, on the very samples just built (decoded back from the shards): encoding only, first with
    # as many processes as the build had workers (same parallelism, started together), then with one.
    manifest = load_manifest(out)
    names = [r.name for r in manifest.shards]
    shares = [
        (out, names[i :: result.num_workers], cfg.png_compression, cfg.png_strategy)
        for i in range(result.num_workers)
    ]
    ctx = mp.get_context("spawn")
    with ctx.Pool(
        result.num_workers, initializer=_init_floor, initargs=(ctx.Barrier(result.num_workers),)
    ) as pool:
        timed = pool.map(_encode_share, shares)
    floor_wall_s = max(dt for _n, dt in timed)
    floor_worker_s = sum(dt for _n, dt in timed) / manifest.num_samples  # worker seconds per sample
    floor_rate = manifest.num_samples / floor_wall_s
    cv2.setNumThreads(1)
    samples = [sample for _key, sample, _members in itertools.islice(iter_corpus(out, manifest), args.subset)]
    t0 = time.perf_counter()
    for sample in samples:
        encode_sample(sample, cfg.png_compression, cfg.png_strategy)
    one_s = (time.perf_counter() - t0) / len(samples)
    w = result.num_workers

    print()
    print(
        f"build:        {build_rate:7.2f} samples/s with {w} workers ({build_rate / w:.2f}/s per worker), "
        f"wall {result.build_s:.1f} s"
    )
    print(
        f"encode floor: {floor_rate:7.2f} samples/s with {w} processes ({floor_rate / w:.2f}/s per process); "
        f"{1 / one_s:.2f}/s in one process alone (first {len(samples)} samples)"
    )
    if w > 1:
        print(
            f"machine:      {w} processes run {floor_rate * one_s:.2f}x one process (the encode floor's own "
            "scaling: per-core figures below are per process at this parallelism)"
        )
    print(
        f"ratio:        build time per sample = {floor_rate / build_rate:.2f}x the encode floor; the shard "
        f"code's own share (encode + tar + hash + fsync) = {own_s / floor_worker_s:.2f}x; "
        f"make_sample adds {make_s / floor_worker_s:.2f}x"
    )
    print(
        "worker time:  "
        + " | ".join(
            f"{k} {1000 * v / result.num_samples_built:.1f} ms/sample ({100 * v / stage_total:.0f}%)"
            for k, v in result.stage_s.items()
        )
        + f"  [make_sample alone: {1000 * make_s:.1f} ms]"
    )
    rss = sorted(result.peak_rss_bytes.values())
    print(f"peak RSS:     {', '.join(format_bytes(r) for r in rss)} (per worker)")
    print(
        f"bytes:        {format_bytes(manifest.num_bytes / manifest.num_samples)}/sample in the tar; "
        f"{len(manifest.shards)} shards; modalities {manifest.modalities}"
    )
    print(
        f"full corpus:  {full_cfg.num_samples} pairs at {build_rate:.2f}/s would take "
        f"{full_cfg.num_samples / build_rate / 60:.1f} min with {w} workers on this machine, as loaded now"
    )

    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    if levels:
        # rle codes levels 1-9 alike (0 stores), so one rle row; rounds alternate to share the load
        codings = [("zlib", level) for level in levels] + [("rle", 1)]
        enc_s: dict[tuple[str, int], list[float]] = {c: [] for c in codings}
        dec_s: dict[tuple[str, int], list[float]] = {c: [] for c in codings}
        sizes: dict[tuple[str, int], float] = {}
        for _round in range(2):
            for strategy, level in codings:
                t0 = time.perf_counter()
                encoded = [encode_sample(sample, level, strategy) for sample in samples]
                enc_s[strategy, level].append((time.perf_counter() - t0) / len(samples))
                t0 = time.perf_counter()
                for i, members in enumerate(encoded):
                    decode_sample(f"x_{i:09d}", members)
                dec_s[strategy, level].append((time.perf_counter() - t0) / len(samples))
                sizes[strategy, level] = sum(len(v) for m in encoded for v in m.values()) / len(samples)
        print()
        print("PNG strategy level | encode ms/sample (one core, best of 2) | decode ms/sample | kB/sample")
        for strategy, level in codings:
            print(
                f"{strategy:>12s} {level:5d} | {1000 * min(enc_s[strategy, level]):38.1f} | "
                f"{1000 * min(dec_s[strategy, level]):16.1f} | {sizes[strategy, level] / 1e3:.1f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

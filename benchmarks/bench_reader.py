"""Reader throughput with DataLoader workers beside the plain decode floor of the same members.

    python benchmarks/bench_reader.py --corpus /tmp/bench_corpus --num-workers 2

Floor: the image, mask and FOV PNGs of the same samples, already in memory, decoded by
data_engine.io.decode_png in `--num-workers` plain processes (no tar, shuffle, checks, tensors, collation
or DataLoader). Reader: make_loader(..., resampled=False) with the same number of workers. They alternate
over rounds (after one warm-up round) and medians are compared, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_engine.io import decode_png  # noqa: E402
from shards.manifest import load_manifest  # noqa: E402
from shards.reader import _new_float_tensor, make_loader  # noqa: E402
from shards.schema import FOV, IMAGE, MASK, decode_sample, iter_samples_bytes  # noqa: E402


def _decode_all(members: list[dict[str, bytes]]) -> float:
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    for m in members:
        decode_png(m[IMAGE], grayscale=False)
        decode_png(m[MASK], grayscale=True)
        if FOV in m:
            decode_png(m[FOV], grayscale=True)
    return time.perf_counter() - t0


def _fresh_batch_seconds(members: list[dict[str, bytes]], batch_size: int, num_batches: int = 8) -> float:
    """Seconds per sample to allocate a batch's float32 image/mask/fov in fresh shared memory and write it
    once: the cost of handing float32 batches from a worker to the main process, on this machine."""
    sample = decode_sample("x_000000000", members[0])
    h, w = sample.mask.shape
    t0 = time.perf_counter()
    for _ in range(num_batches):
        for channels in (3, 1, 1):
            _new_float_tensor((batch_size, channels, h, w), shared=True).fill_(0.5)
    return (time.perf_counter() - t0) / (num_batches * batch_size)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus", required=True, help="a built corpus folder (e.g. from bench_build.py --out)"
    )
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--rounds", type=int, default=3, help="timed rounds (floor, then a reader pass), after one warm-up"
    )
    args = parser.parse_args()

    folder = Path(args.corpus)
    manifest = load_manifest(folder)
    script = os.path.relpath(Path(sys.argv[0]).resolve(), Path.cwd())
    print(f"command: python {shlex.join([script, *sys.argv[1:]])}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}; date {datetime.date.today()}"
    )
    print(f"corpus: {manifest.num_samples} samples in {len(manifest.shards)} shards, {folder}")

    members = [m for r in manifest.shards for _k, m in iter_samples_bytes((folder / r.name).read_bytes())]
    parts = [members[i :: args.num_workers] for i in range(args.num_workers)]
    loader = make_loader(
        str(folder), batch_size=args.batch_size, num_workers=args.num_workers, seed=0, resampled=False
    )
    floor_rates, reader_rates = [], []
    # Floor and reader alternate, round after round, so that both see the same load on a shared machine.
    with mp.get_context("spawn").Pool(args.num_workers) as pool:
        pool.map(_decode_all, [p[:4] for p in parts])  # start-up and imports, untimed
        for r in range(args.rounds + 1):
            t0 = time.perf_counter()
            pool.map(_decode_all, parts)
            floor_rate = len(members) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            n = sum(len(batch["key"]) for batch in loader)
            reader_rate = n / (time.perf_counter() - t0)
            warm = " (warm-up, not counted)" if r == 0 else ""
            print(
                f"  round {r}: decode floor {floor_rate:6.1f}/s, reader {reader_rate:6.1f}/s "
                f"({n} samples){warm}"
            )
            if r > 0:
                floor_rates.append(floor_rate)
                reader_rates.append(reader_rate)
    one_core = len(members) / _decode_all(members)
    transport_s = _fresh_batch_seconds(members, args.batch_size)
    counters = loader.dataset.counters  # type: ignore[attr-defined]
    floor_rate, reader_rate = statistics.median(floor_rates), statistics.median(reader_rates)
    best = max(r / f for r, f in zip(reader_rates, floor_rates, strict=True))
    print()
    print(
        f"decode floor: {floor_rate:7.1f} samples/s with {args.num_workers} processes "
        f"(median of {args.rounds}; "
        f"{one_core:.1f}/s in one process alone)"
    )
    print(
        f"reader:       {reader_rate:7.1f} samples/s with {args.num_workers} DataLoader workers, batch "
        f"{args.batch_size} (float32 tensors, checks, shuffle buffer 1000; median)"
    )
    print(
        f"ratio:        reader = {100 * reader_rate / floor_rate:.0f}% of the decode floor "
        f"(medians; best round "
        f"{100 * best:.0f}%); bad shards {counters.bad_shards}, bad samples {counters.bad_samples}"
    )
    print(
        f"transport:    allocating and first-touching one sample's float32 outputs in fresh shared memory "
        f"takes {1000 * transport_s:.1f} ms here, vs {1000 / one_core:.1f} ms to decode it"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

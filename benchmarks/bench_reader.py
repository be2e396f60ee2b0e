"""Reader throughput with DataLoader workers beside the plain decode floor of the same members.

    python benchmarks/bench_reader.py --corpus /tmp/bench_corpus --num-workers 2

Floor: the image, mask and FOV PNGs of the same samples, already in memory, decoded by
data_engine.io.decode_png in `--num-workers` plain processes (no tar, shuffle, checks, tensors, collation
or DataLoader). Reader: make_loader(..., resampled=False) with the same number of workers, with the
default float32 output, with output_dtype="uint8" (the consumer converts on its device with
to_float_batch; that conversion is timed apart, on this CPU), and with uint8 and recycle=0 (workers
refill their shared batch buffers instead of fresh shared memory per batch). They alternate over rounds
(after one warm-up round) and medians are compared, so all see the same machine load.
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
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_engine.io import decode_png  # noqa: E402
from shards.manifest import load_manifest  # noqa: E402
from shards.reader import OUTPUT_DTYPES, _new_tensor, make_loader, to_float_batch  # noqa: E402
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


def _fresh_batch_seconds(
    members: list[dict[str, bytes]], batch_size: int, dtype: torch.dtype, num_batches: int = 8
) -> float:
    """Seconds per sample to allocate a batch's image/mask/fov in fresh shared memory and write it once:
    the cost of handing such batches from a worker to the main process, on this machine."""
    sample = decode_sample("x_000000000", members[0])
    h, w = sample.mask.shape
    t0 = time.perf_counter()
    for _ in range(num_batches):
        for channels in (3, 1, 1):
            _new_tensor((batch_size, channels, h, w), dtype, shared=True).fill_(1)
    return (time.perf_counter() - t0) / (num_batches * batch_size)


def _convert_seconds(batch: dict, num_reps: int = 5) -> float:
    """Seconds per sample for to_float_batch on this CPU (one thread), best of `num_reps`."""
    best = float("inf")
    for _ in range(num_reps):
        t0 = time.perf_counter()
        to_float_batch(batch)
        best = min(best, time.perf_counter() - t0)
    return best / len(batch["key"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus", required=True, help="a built corpus folder (e.g. from bench_build.py --out)"
    )
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--max-shards", type=int, default=0, help="read the first N shards only (0: all; held in memory)"
    )
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
    records = manifest.shards[: args.max_shards] if args.max_shards else manifest.shards
    print(
        f"corpus: {manifest.num_samples} samples in {len(manifest.shards)} shards, {folder}; read: "
        f"{sum(r.num_samples for r in records)} samples in {len(records)} shards"
    )
    urls = [str(folder / r.name) for r in records]
    members = [m for r in records for _k, m in iter_samples_bytes((folder / r.name).read_bytes())]
    parts = [members[i :: args.num_workers] for i in range(args.num_workers)]
    torch.set_num_threads(1)
    variants: dict[str, tuple[str, int | None]] = {dtype: (dtype, None) for dtype in OUTPUT_DTYPES}
    variants["uint8-recycled"] = ("uint8", 0)  # workers reuse their shared batch buffers
    loaders = {
        name: make_loader(
            urls,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            seed=0,
            resampled=False,
            output_dtype=dtype,
            recycle=recycle,
        )
        for name, (dtype, recycle) in variants.items()
    }
    floor_rates: list[float] = []
    reader_rates: dict[str, list[float]] = {name: [] for name in loaders}
    last_uint8_batch: dict = {}
    # Floor and readers alternate, round after round, so that all see the same load on a shared machine.
    with mp.get_context("spawn").Pool(args.num_workers) as pool:
        pool.map(_decode_all, [p[:4] for p in parts])  # start-up and imports, untimed
        for r in range(args.rounds + 1):
            t0 = time.perf_counter()
            pool.map(_decode_all, parts)
            floor_rate = len(members) / (time.perf_counter() - t0)
            line = f"  round {r}: decode floor {floor_rate:6.1f}/s"
            for name, loader in loaders.items():
                t0 = time.perf_counter()
                n = 0
                for batch in loader:
                    n += len(batch["key"])
                    if name == "uint8" and len(batch["key"]) == args.batch_size:
                        last_uint8_batch = batch
                rate = n / (time.perf_counter() - t0)
                line += f", {name} {rate:6.1f}/s"
                if r > 0:
                    reader_rates[name].append(rate)
            print(line + (" (warm-up, not counted)" if r == 0 else ""), flush=True)
            if r > 0:
                floor_rates.append(floor_rate)
    one_core = len(members) / _decode_all(members)
    floor_rate = statistics.median(floor_rates)
    print()
    print(
        f"decode floor: {floor_rate:7.1f} samples/s with {args.num_workers} processes "
        f"(median of {args.rounds}; {one_core:.1f}/s in one process alone)"
    )
    for name, loader in loaders.items():
        dtype, recycle = variants[name]
        rate = statistics.median(reader_rates[name])
        best = max(r / f for r, f in zip(reader_rates[name], floor_rates, strict=True))
        counters = loader.dataset.counters  # type: ignore[attr-defined]
        print(
            f"reader {name:14s} {rate:7.1f} samples/s with {args.num_workers} DataLoader workers, batch "
            f"{args.batch_size} (checks, shuffle buffer 1000; median) = {100 * rate / floor_rate:.0f}% of "
            f"the decode floor (best round {100 * best:.0f}%); bad shards {counters.bad_shards}, bad "
            f"samples {counters.bad_samples}"
        )
        if recycle is not None:
            print(
                f"  recycle={recycle}: {counters.reused_buffers} batches written into reused shared buffers"
            )
        else:
            transport_s = _fresh_batch_seconds(members, args.batch_size, OUTPUT_DTYPES[dtype])
            print(
                f"  transport:  allocating and first-touching one sample's {dtype} outputs in fresh shared "
                f"memory takes {1000 * transport_s:.2f} ms here, vs {1000 / one_core:.1f} ms to decode it"
            )
    if last_uint8_batch:
        print(
            f"to_float_batch: {1000 * _convert_seconds(last_uint8_batch):.2f} ms/sample on this CPU (one "
            "thread, in the consumer; on a GPU it runs there, after a 4x smaller copy)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

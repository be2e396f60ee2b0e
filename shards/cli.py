"""`univg shards ...`: build, merge, verify, preview and stats of WebDataset shard corpora.

univg shards build --config configs/corpus/tiny.yaml --out data/shards/tiny --workers 2
univg shards build --config configs/corpus/univg58k.yaml --out DIR --num-nodes 8 --node-rank 3
univg shards build --config C --out DIR --engine.seed 7 num_samples=1000   # dotted overrides
univg shards merge DIR
univg shards verify DIR [--workers N]
univg shards preview DIR --out grid.png [--per-modality K]
univg shards stats DIR [--max-samples N] [--json stats.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shards.config import CorpusConfig
from univg.config import add_config_options, cli_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Subcommands of `univg shards`."""
    sub = parser.add_subparsers(dest="shards_command", metavar="SUBCOMMAND", required=True)

    b = sub.add_parser(
        "build",
        allow_abbrev=False,
        help="build (or complete) a corpus's shards and manifest",
        description="Build the shards of a corpus config; rerunning completes an interrupted build. "
        "Any config field can be overridden as --dotted.key VALUE or dotted.key=VALUE.",
    )
    b.add_argument("--config", required=True, help="corpus YAML, e.g. configs/corpus/tiny.yaml")
    b.add_argument("--out", required=True, help="corpus folder for shards, records and manifest")
    b.add_argument(
        "--workers", type=int, default=None, help="worker processes here (default: the usable cores)"
    )
    b.add_argument("--num-nodes", type=int, default=1, help="machines the build is split over (default 1)")
    b.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0..num-nodes-1 (default 0)")
    b.add_argument("--overwrite", action="store_true", help="replace a different corpus found in --out")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    add_config_options(b, CorpusConfig)

    g = sub.add_parser(
        "ingest", help="write a real labelled collection (pairs.csv or images/+masks/) as shards"
    )
    g.add_argument("--task", required=True, help="task manifest CSV, or a folder with images/ and masks/")
    g.add_argument("--modality", required=True, help="modality name for every sample (any lower-case name)")
    g.add_argument("--out", required=True, help="corpus folder")
    g.add_argument("--name", default=None, help="corpus name (default: the task's folder name)")
    g.add_argument("--splits", default=None, help="comma-separated splits to take (default: all)")
    g.add_argument("--samples-per-shard", type=int, default=256, help="pairs per shard (default 256)")
    g.add_argument("--png-compression", type=int, default=1, help="zlib level 0-9 (default 1)")
    g.add_argument("--overwrite", action="store_true", help="replace a different corpus found in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    m = sub.add_parser("merge", help="merge node slice manifests into manifest.json")
    m.add_argument("dir", help="corpus folder")

    v = sub.add_parser("verify", help="check sha256, sizes and every sample; non-zero exit names bad shards")
    v.add_argument("dir", help="corpus folder")
    v.add_argument("--workers", type=int, default=None, help="processes (default: the usable cores)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("preview", help="write a grid picture of mask | image pairs per modality")
    p.add_argument("dir", help="corpus folder")
    p.add_argument("--out", required=True, help="picture to write (.png)")
    p.add_argument("--per-modality", type=int, default=4, help="pairs per modality row (default 4)")
    p.add_argument("--tile-px", type=int, default=128, help="side of each tile in pixels (default 128)")

    s = sub.add_parser("stats", help="per-modality counts, vessel fraction, intensities, bytes per sample")
    s.add_argument("dir", help="corpus folder")
    s.add_argument("--max-samples", type=int, default=None, help="examine only the first N samples")
    s.add_argument("--json", default=None, help="also write the numbers to this JSON file")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a SLURM or container allotment), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run(args: argparse.Namespace) -> int:
    """Run one `univg shards` subcommand; returns the exit status."""
    command = args.shards_command
    if command == "build":
        from shards.build import build_corpus, summary
        from shards.config import load_corpus_config

        cfg = load_corpus_config(args.config, cli_overrides(args, args.overrides))
        result = build_corpus(
            cfg,
            Path(args.out),
            num_workers=usable_cores() if args.workers is None else args.workers,
            num_nodes=args.num_nodes,
            node_rank=args.node_rank,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        print(summary(result))
        return 0
    if command == "ingest":
        from shards.build import format_bytes
        from shards.ingest import ingest_corpus

        manifest = ingest_corpus(
            args.task,
            args.modality,
            args.out,
            name=args.name,
            splits=args.splits.split(",") if args.splits else None,
            samples_per_shard=args.samples_per_shard,
            png_compression=args.png_compression,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        print(
            f"ingested {manifest.num_samples} {args.modality} pairs as corpus {manifest.corpus} in "
            f"{len(manifest.shards)} shard(s) ({format_bytes(manifest.num_bytes)}) -> {args.out}"
        )
        return 0
    if command == "merge":
        from shards.build import format_bytes, merge

        manifest = merge(args.dir)
        print(
            f"merged {manifest.num_samples} samples in {len(manifest.shards)} shards "
            f"({format_bytes(manifest.num_bytes)}) into {Path(args.dir) / 'manifest.json'}"
        )
        return 0
    if command == "verify":
        from shards.inspect import verify_corpus

        workers = usable_cores() if args.workers is None else args.workers
        report = verify_corpus(args.dir, num_workers=workers, progress=not args.no_progress)
        for note in report.notes:
            print(f"note: {note}")
        for name, problem in report.bad_shards.items():
            print(f"BAD {name}: {problem}", file=sys.stderr)
        good = report.num_shards - len(report.bad_shards)
        print(
            f"{good}/{report.num_shards} shards ok, {report.num_samples} samples checked in {report.folder}"
        )
        return 0 if report.ok else 1
    if command == "preview":
        from shards.inspect import preview_corpus

        h, w = preview_corpus(args.dir, args.out, per_modality=args.per_modality, tile_px=args.tile_px)
        print(f"wrote {args.out} ({w}x{h} px)")
        return 0
    if command == "stats":
        from shards.inspect import corpus_stats, format_stats

        stats = corpus_stats(args.dir, max_samples=args.max_samples)
        print(format_stats(stats))
        if args.json:
            Path(args.json).write_text(json.dumps(stats, indent=1) + "\n")
        return 0
    raise ValueError(f"unknown shards subcommand {command!r}")

"""Pretrain a segmenter on a shard corpus (the engine's synthetic pairs of every modality), so that few-shot
runs can start from its weights (`pretrained_segmenter` in a fine-tuning config) instead of from scratch.

    univg segmenter-pretrain --shards data/shards/univg58k --out runs/segmenter_univg58k --steps 18000
    univg segmenter-pretrain --shards configs/corpus/univg58k.yaml --out runs/seg --steps 18000

The segmenter section of the fine-tuning profile (`--profile`, default cpu-fast) sets the network, patches,
augmentation, loss and optimizer; `--steps` its length. Pairs stream from the shards in a seeded random
shard order through the segmenter's ring pool (patch.synthetic_pool_size pairs in memory, refreshed every
step). Given the corpus config instead of the folder (the second line), the data engine makes the same
pairs on the fly, with no corpus on disk, and the weights come out the same. Writes `<out>/model` (a
segmenter folder `univg segment` also reads), `<out>/config.yaml` and `<out>/pretrain.log`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from finetune.config import FinetuneConfig, load_finetune_config
from univg.config import to_dict

if TYPE_CHECKING:
    from shards.config import CorpusConfig
    from shards.manifest import Manifest

log = logging.getLogger("univg.segmenter_pretrain")


def is_corpus_config(source: str | Path) -> bool:
    """Whether a corpus source names a corpus config (a YAML file) rather than a built shard folder."""
    return Path(source).suffix in (".yaml", ".yml")


def corpus_pairs(source: str | Path, seed: int, modalities: set[str] | None = None) -> Iterator[tuple]:
    """(image, mask) pairs of a corpus, shard order shuffled by `seed` and repeated without end.

    `source` is a shard corpus folder (`univg shards build`), or the corpus config YAML such a folder is
    built from: then the data engine makes the pairs as they are needed, the same arrays in the same order
    as reading the built corpus (its PNGs are lossless and sample i is a pure function of the config), for
    a few ms of CPU per 512 px pair and no disk.
    """
    corpus, held = _open(source)
    unknown = (modalities or set()) - held
    if unknown:
        raise ValueError(f"{source}: no samples of modality {sorted(unknown)}; it holds {sorted(held)}")
    if is_corpus_config(source):
        return _engine_pairs(corpus, seed, modalities)
    return _shard_pairs(Path(source), corpus, seed, modalities)


def corpus_modalities(source: str | Path) -> set[str]:
    """The modalities a corpus source (as corpus_pairs takes it) holds; OSError, ValueError or KeyError
    when it is no readable corpus."""
    return _open(source)[1]


def _open(source: str | Path) -> tuple[Any, set[str]]:
    """(the corpus config or the shard manifest, the modalities it holds)."""
    from shards.config import load_corpus_config
    from shards.manifest import load_manifest

    if is_corpus_config(source):
        cfg = load_corpus_config(source)
        return cfg, {m for m, share in cfg.engine.modalities.items() if share > 0}
    manifest = load_manifest(source)
    return manifest, set(manifest.modalities)


def _shard_pairs(folder: Path, manifest: Manifest, seed: int, modalities: set[str] | None) -> Iterator[tuple]:
    from shards.schema import META, decode_sample, iter_samples_bytes

    rng = np.random.default_rng(seed)
    while True:
        for i in rng.permutation(len(manifest.shards)):
            record = manifest.shards[i]
            for key, members in iter_samples_bytes((folder / record.name).read_bytes(), record.name):
                # the modality is read from the small meta member, so filtered-out samples are never decoded
                if modalities is not None and json.loads(members[META]).get("modality") not in modalities:
                    continue
                sample = decode_sample(key, members)
                yield sample.image, sample.mask


def _engine_pairs(cfg: CorpusConfig, seed: int, modalities: set[str] | None) -> Iterator[tuple]:
    from data_engine.corpus import make_sample, modality_of

    rng = np.random.default_rng(seed)  # the shards' order, drawn as _shard_pairs draws it
    while True:
        for shard in rng.permutation(cfg.num_shards):
            for i in cfg.shard_indices(int(shard)):
                if modalities is not None and modality_of(cfg.engine, i) not in modalities:
                    continue
                sample = make_sample(cfg.engine, i)
                yield sample.image, sample.mask


def _refuse_existing(out: Path) -> Path:
    """out/model, after making sure no pretrained segmenter is there already (FileExistsError)."""
    model_dir = out / "model"
    if (model_dir / "config.json").is_file():
        raise FileExistsError(f"{model_dir} exists: pick another --out (nothing was changed)")
    return model_dir


def pretrain_segmenter(
    shards_dir: str | Path,
    out: str | Path,
    cfg: FinetuneConfig,
    modalities: set[str] | None = None,
    progress: bool = True,
) -> Path:
    """Train cfg.segmenter on the corpus alone; returns the model folder."""
    from finetune.segmenter import train_segmenter

    out = Path(out)
    model_dir = _refuse_existing(out)
    pairs = corpus_pairs(shards_dir, cfg.segmenter.seed, modalities)  # a bad corpus stops before any write
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump({"segmenter": to_dict(cfg.segmenter)}, sort_keys=False))
    started = time.perf_counter()
    segmenter = train_segmenter(cfg.segmenter, [], synthetic=pairs, progress=progress)
    segmenter.record["pretrained_on"] = str(Path(shards_dir).resolve())
    segmenter.save(model_dir)
    log.info("pretrained segmenter: %s (%.0f s)", model_dir, time.perf_counter() - started)
    return model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shards",
        required=True,
        help="a shard corpus folder (univg shards build), or its corpus config YAML (pairs made on the fly)",
    )
    parser.add_argument("--out", required=True, help="new folder for the pretrained segmenter")
    parser.add_argument("--profile", default="cpu-fast", help="configs/finetune/<profile>.yaml or a path")
    parser.add_argument(
        "--steps",
        type=int,
        default=18000,
        help="optimizer steps (18000: ~31 min on 2 CPU cores with cpu-fast)",
    )
    parser.add_argument("--modalities", help="comma-separated modalities to keep (default: all)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides of the profile, e.g. segmenter.optim.lr=3e-4"
    )


def run(args: argparse.Namespace) -> int:
    from finetune.run import checkout_path, profile_path

    _refuse_existing(Path(args.out))  # before the config is read, so a finished folder is named first
    cfg = load_finetune_config(
        profile_path(args.profile), [*args.overrides, f"segmenter.optim.max_steps={args.steps}"]
    )
    shards = checkout_path(args.shards)  # configs/corpus/univg58k.yaml is found from any folder
    modalities = set(args.modalities.split(",")) if args.modalities else None
    corpus_pairs(shards, cfg.segmenter.seed, modalities)  # a bad corpus stops before the log file is made
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    handler = logging.FileHandler(out / "pretrain.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger().addHandler(handler)
    pretrain_segmenter(shards, out, cfg, modalities, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="univg segmenter-pretrain", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))

"""`univg shards ingest`: a real labelled collection into the same shard format as the synthetic corpus.

    manifest = ingest_corpus("../shared/data/CHASE_DB1/pairs.csv", "fundus", Path("data/shards/chase"))

Cases are read by data_engine.ingest (any image format, masks thresholded at half their maximum) and
kept at their own size (the reader's `image_size_px` resizes). Sample i is the i-th case of the wanted
splits in task order; its meta names the source set, case, split, files and licence.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import univg
from data_engine.corpus import Sample
from shards.build import check_output_folder
from shards.config import NAME_RE
from shards.manifest import MANIFEST, Manifest, load_manifest, write_manifest, write_record
from shards.schema import MODALITY_RE, encode_sample, sample_key
from shards.writer import ShardRecord, ShardWriter, shard_name
from univg.config import to_dict


@dataclass(frozen=True)
class IngestConfig:
    """What an ingested corpus was made from; its hash guards the output folder like a build's."""

    name: str  # corpus name (letters, digits, '_', '-'): prefixes keys and shard files
    task: str  # the task's name (its folder name)
    modality: str  # modality name given to every sample; may be one the corpus never had
    splits: tuple[str, ...]  # splits taken from the task, sorted
    num_samples: int  # cases ingested (count)
    samples_per_shard: int  # pairs per shard (count)
    png_compression: int  # zlib level 0-9


def ingest_corpus(
    task_path: str | Path,
    modality: str,
    out: str | Path,
    *,
    name: str | None = None,
    splits: list[str] | None = None,
    samples_per_shard: int = 256,
    png_compression: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Write the task's cases as shards + manifest.json in `out`; returns the manifest."""
    from data_engine.ingest import SPLITS, ingest_samples, read_task

    if not MODALITY_RE.match(modality):
        raise ValueError(f"--modality {modality!r} must be a lower-case name (letters, digits, '_', '-')")
    if samples_per_shard < 1 or not 0 <= png_compression <= 9:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1, png_compression 0..9")
    task = read_task(task_path)
    wanted = tuple(sorted(splits if splits else SPLITS))
    cases = [c for c in task.cases if c.split in wanted]
    if not cases:
        raise ValueError(f"{task_path}: no cases in split(s) {list(wanted)}")
    name = name or re.sub(r"[^A-Za-z0-9_-]", "_", task.name).lower()
    if not NAME_RE.match(name):
        raise ValueError(f"--name {name!r} may hold only letters, digits, '_' and '-'")
    cfg = IngestConfig(
        name=name,
        task=task.name,
        modality=modality,
        splits=wanted,
        num_samples=len(cases),
        samples_per_shard=samples_per_shard,
        png_compression=png_compression,
    )
    samples = ingest_samples(task, modality, splits=list(wanted))
    return write_samples(
        samples,
        num_samples=len(cases),
        name=name,
        out=Path(out),
        config=to_dict(cfg),
        modality=modality,
        samples_per_shard=samples_per_shard,
        png_compression=png_compression,
        overwrite=overwrite,
        progress=progress,
        desc="ingest",
    )


def write_samples(
    samples: Iterable[Sample],
    *,
    num_samples: int,
    name: str,
    out: Path,
    config: dict[str, Any],
    modality: str,
    samples_per_shard: int = 256,
    png_compression: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "write",
) -> Manifest:
    """Write samples (in order; sample i gets key `<name>_<i:09d>`) as shards + manifest.json in `out`.

    `config` (plain data) and its hash go into the manifest and guard the folder: another config there is
    refused unless `overwrite`. A folder whose manifest already holds this config is kept as it is.
    """
    from tqdm import tqdm

    # the same canonical JSON as univg.config.config_hash, so an ingest config hashes as it always did
    cfg_hash = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    check_output_folder(name, out, cfg_hash, overwrite)
    if (out / MANIFEST).is_file():
        existing = load_manifest(out)
        if existing.config_hash == cfg_hash and existing.num_samples == num_samples:
            return existing
    out.mkdir(parents=True, exist_ok=True)
    records: list[ShardRecord] = []
    writer: ShardWriter | None = None
    try:
        bar = tqdm(samples, total=num_samples, desc=desc, unit="pair", disable=not progress)
        for i, sample in enumerate(bar):
            if writer is None:
                writer = ShardWriter(out / shard_name(name, len(records)))
            writer.add(sample_key(name, i), encode_sample(sample, png_compression), modality)
            if (i + 1) % samples_per_shard == 0:
                records.append(writer.commit())
                write_record(out, records[-1], cfg_hash)
                writer = None
        if writer is not None:
            records.append(writer.commit())
            write_record(out, records[-1], cfg_hash)
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    manifest = Manifest(
        corpus=name,
        config=config,
        config_hash=cfg_hash,
        univg_version=univg.__version__,
        shards=tuple(records),
    )
    write_manifest(out / MANIFEST, manifest)
    return manifest

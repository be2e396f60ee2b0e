"""Small hand-drawn corpora for the shards tests: real writer and manifest, no data engine needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_engine import MODALITIES
from data_engine.corpus import EngineConfig, Sample
from shards.config import CorpusConfig
from shards.manifest import MANIFEST, Manifest, write_manifest
from shards.schema import encode_sample, sample_key
from shards.writer import ShardWriter, shard_name
from univg.config import config_hash, to_dict

SIZE_PX = 16
HAND_MODALITIES = (*MODALITIES, "ultrasound")  # the last one is not built in: the spare slot


def hand_sample(i: int, size_px: int = SIZE_PX) -> Sample:
    """Sample i: a vessel that is row (i % size) from column 2 to 11; colour for even i, with a FOV when
    i % 3 == 0; image pixel values encode i so tests can check what they got."""
    modality = HAND_MODALITIES[i % len(HAND_MODALITIES)]
    mask = np.zeros((size_px, size_px), np.uint8)
    mask[i % size_px, 2:12] = 255
    if i % 2 == 0:
        image = np.empty((size_px, size_px, 3), np.uint8)
        image[..., 0], image[..., 1], image[..., 2] = 10, 100, i % 256  # B, G, R
    else:
        image = np.full((size_px, size_px), i % 256, np.uint8)
    fov = None
    if i % 3 == 0:
        fov = np.zeros((size_px, size_px), np.uint8)
        fov[1:-1, 1:-1] = 255
    return Sample(image=image, mask=mask, fov=fov, meta={"modality": modality, "source": "hand", "index": i})


def hand_config(name: str = "hand", num_samples: int = 40, samples_per_shard: int = 8) -> CorpusConfig:
    return CorpusConfig(
        name=name,
        num_samples=num_samples,
        samples_per_shard=samples_per_shard,
        engine=EngineConfig(image_size_px=32),
    )


def write_hand_corpus(folder: Path, cfg: CorpusConfig | None = None, manifest: bool = True) -> CorpusConfig:
    """Shards of hand samples for cfg's layout (and manifest.json unless manifest=False)."""
    cfg = cfg or hand_config()
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for s in range(cfg.num_shards):
        with ShardWriter(folder / shard_name(cfg.name, s)) as w:
            for i in cfg.shard_indices(s):
                sample = hand_sample(i)
                w.add(
                    sample_key(cfg.name, i),
                    encode_sample(sample, cfg.png_compression),
                    sample.meta["modality"],
                )
            records.append(w.commit())
    if manifest:
        write_manifest(
            folder / MANIFEST,
            Manifest(
                corpus=cfg.name,
                config=to_dict(cfg),
                config_hash=config_hash(cfg),
                univg_version="test",
                shards=tuple(records),
            ),
        )
    return cfg


def member_offset(tar_path: Path, member_name: str) -> tuple[int, int]:
    """(offset of the data, size) of a tar member: where to flip a bit inside it."""
    import tarfile

    with tarfile.open(tar_path) as tar:
        info = tar.getmember(member_name)
        return info.offset_data, info.size


def flip_bit(path: Path, offset: int, bit: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def truncate(path: Path, num_bytes: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:num_bytes])

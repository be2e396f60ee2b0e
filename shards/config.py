"""The corpus config: what `univg shards build` makes, as one frozen dataclass.

    cfg = load_corpus_config("configs/corpus/tiny.yaml", ["engine.seed=3"])

Shard s holds samples [s * samples_per_shard, min(num_samples, (s + 1) * samples_per_shard)).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from data_engine.corpus import EngineConfig
from shards.schema import PNG_STRATEGIES
from univg.config import ConfigError, load_config

NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class CorpusConfig:
    """One synthetic corpus: its name, size, shard layout, PNG coding and the engine that makes sample i."""

    name: str  # corpus name (letters, digits, '_', '-'); prefixes every sample key and shard file name
    num_samples: int  # mask-image pairs in the corpus (count)
    samples_per_shard: int = 256  # pairs per tar shard (count); the last shard may hold fewer
    png_compression: int = (
        1  # zlib level 0-9 of every PNG member (cv2.IMWRITE_PNG_COMPRESSION); with "rle", 1-9 code alike
    )
    png_strategy: str = (
        "rle"  # shards.schema.PNG_STRATEGIES: "rle" measured 2.5x faster than "zlib" (level 1), and smaller
    )
    engine: EngineConfig = field(
        default_factory=EngineConfig
    )  # what sample i looks like (seed, size px, mix)

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(
                f"name={self.name!r} may hold only letters, digits, '_' and '-' (it prefixes keys)"
            )
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples} must be >= 1")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard} must be >= 1")
        if not 0 <= self.png_compression <= 9:
            raise ValueError(f"png_compression={self.png_compression} must be a zlib level in 0..9")
        if self.png_strategy not in PNG_STRATEGIES:
            raise ValueError(f"png_strategy={self.png_strategy!r} must be one of {list(PNG_STRATEGIES)}")

    @property
    def num_shards(self) -> int:
        """Number of shards, the last one possibly partial."""
        return -(-self.num_samples // self.samples_per_shard)

    def shard_indices(self, shard: int) -> range:
        """Sample indices that shard `shard` holds."""
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} out of range 0..{self.num_shards - 1}")
        start = shard * self.samples_per_shard
        return range(start, min(self.num_samples, start + self.samples_per_shard))


def load_corpus_config(path: str | Path, overrides: list[str] | None = None) -> CorpusConfig:
    """Load a corpus YAML plus dotted overrides; any bad value raises a ConfigError naming the file."""
    try:
        return load_config(CorpusConfig, path, overrides)
    except ConfigError:
        raise
    except ValueError as e:  # a field check in __post_init__ (ours or the engine's)
        raise ConfigError(f"{path}: {e}") from e

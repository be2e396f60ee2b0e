"""Sample `i` of a synthetic corpus: a pure function of (engine config, seed, i).

    sample = make_sample(cfg, i)   # same cfg and i -> byte-identical arrays, on any machine or worker

Each sample picks a modality and a mask source by low-discrepancy sequences of `i` (so every shard holds
the configured mix, without knowing the corpus size), draws a vessel mask from that source, and renders
the modality's appearance for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_engine import MODALITIES

# Golden-ratio and silver-ratio steps: two independent, evenly spread sequences over [0, 1).
_GOLDEN_STEP = 0.6180339887498949
_SILVER_STEP = 0.4142135623730951


@dataclass(frozen=True)
class SourceMix:
    """Share of masks from each source; the shares are normalised to sum to 1."""

    procedural: float = 0.35  # fresh procedural trees, modality-specific anatomy
    recombined: float = 0.40  # grafted sub-trees from the graph library, warped and re-styled
    regrowth: float = 0.25  # space-colonization regrowth inside the region of a library mask


@dataclass(frozen=True)
class LibraryConfig:
    """The graph library that recombination draws from, built once per process from the seed."""

    num_graphs_per_modality: int = 24  # procedural masks decomposed into graphs, per modality
    seed_mask_dir: str | None = None  # optional folder of real vessel masks decomposed into the library too


@dataclass(frozen=True)
class MorphologyConfig:
    """Ranges [low, high] that each recombined or grown mask draws its controls from, uniformly."""

    radius_scale: tuple[float, float] = (0.8, 1.25)  # factor on every vessel radius
    tortuosity: tuple[float, float] = (0.0, 0.5)  # smooth lateral wiggle, as a fraction of segment length
    branch_density: tuple[float, float] = (0.6, 1.4)  # factor on the number of branches grown or grafted
    pruning_depth: tuple[int, int] = (0, 2)  # terminal branch generations removed
    vessel_count: tuple[int, int] = (1, 3)  # trees or grafted sub-trees per canvas
    rotation_deg: tuple[float, float] = (-180.0, 180.0)  # rotation of grafted sub-trees
    scale: tuple[float, float] = (0.8, 1.2)  # isotropic scale of grafted sub-trees
    elastic_px: tuple[float, float] = (0.0, 6.0)  # amplitude of the smooth elastic warp of centrelines


@dataclass(frozen=True)
class EngineConfig:
    """Everything that decides what sample i looks like."""

    seed: int = 0  # corpus seed; sample i uses np.random.default_rng([seed, i])
    image_size_px: int = 512  # square output size
    modalities: dict[str, float] = field(default_factory=lambda: {m: 1.0 for m in MODALITIES})  # share each
    sources: SourceMix = field(default_factory=SourceMix)
    library: LibraryConfig = field(default_factory=LibraryConfig)
    morphology: MorphologyConfig = field(default_factory=MorphologyConfig)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.modalities) - set(MODALITIES))
        if unknown:
            raise ValueError(
                f"engine.modalities: unknown modality {unknown[0]!r}; built in: {list(MODALITIES)}"
            )
        if (
            not self.modalities
            or any(w < 0 for w in self.modalities.values())
            or not sum(self.modalities.values())
        ):
            raise ValueError(
                f"engine.modalities={self.modalities} needs non-negative shares with a positive sum"
            )
        if self.image_size_px < 32 or self.image_size_px % 8:
            raise ValueError(f"engine.image_size_px={self.image_size_px} must be a multiple of 8 and >= 32")
        shares = (self.sources.procedural, self.sources.recombined, self.sources.regrowth)
        if any(s < 0 for s in shares) or sum(shares) <= 0:
            raise ValueError(f"engine.sources={self.sources} needs non-negative shares with a positive sum")


@dataclass
class Sample:
    """One mask-image pair, checked where it is made."""

    image: np.ndarray  # HxW or HxWx3 uint8 (BGR, as OpenCV writes it)
    mask: np.ndarray  # HxW uint8, vessel 255, background 0
    fov: np.ndarray | None  # HxW uint8 {0,255} field of view, or None where the modality has none
    meta: dict[str, Any]  # modality, source, seed, index, generator parameters

    def __post_init__(self) -> None:
        h, w = self.mask.shape[:2]
        if self.mask.dtype != np.uint8 or self.mask.ndim != 2:
            raise ValueError(f"mask must be HxW uint8, got {self.mask.dtype} {self.mask.shape}")
        if self.image.dtype != np.uint8 or self.image.shape[:2] != (h, w) or self.image.ndim not in (2, 3):
            raise ValueError(
                f"image must be uint8 {h}x{w} or {h}x{w}x3, got {self.image.dtype} {self.image.shape}"
            )
        if self.fov is not None and (self.fov.shape != (h, w) or self.fov.dtype != np.uint8):
            raise ValueError(f"fov must be uint8 {h}x{w}, got {self.fov.dtype} {self.fov.shape}")


def pick(weights: dict[str, float], u: float) -> str:
    """The key whose cumulative share interval holds u in [0, 1)."""
    total = sum(weights.values())
    acc = 0.0
    for key, w in weights.items():
        acc += w / total
        if u < acc:
            return key
    return next(k for k, w in reversed(weights.items()) if w > 0)


def modality_of(cfg: EngineConfig, index: int) -> str:
    """Modality of sample `index`: evenly interleaved by the configured shares."""
    return pick(cfg.modalities, (index * _GOLDEN_STEP + 0.5) % 1.0)


def source_of(cfg: EngineConfig, index: int) -> str:
    """Mask source of sample `index`: 'procedural', 'recombined' or 'regrowth'."""
    s = cfg.sources
    shares = {"procedural": s.procedural, "recombined": s.recombined, "regrowth": s.regrowth}
    return pick(shares, (index * _SILVER_STEP + 0.25) % 1.0)


_LIBRARIES: dict[str, dict[str, list[Any]]] = {}


def graph_library(cfg: EngineConfig) -> dict[str, list[Any]]:
    """Per modality, the vessel graphs recombination draws from; deterministic in cfg, cached per process."""
    from data_engine.recombine import build_library

    key = repr(cfg)
    if key not in _LIBRARIES:
        _LIBRARIES.clear()  # one corpus per process at a time; keeps memory flat
        _LIBRARIES[key] = build_library(cfg)
    return _LIBRARIES[key]


def make_sample(cfg: EngineConfig, index: int) -> Sample:
    """Sample `index` of the corpus described by `cfg`."""
    from data_engine.recombine import make_mask
    from data_engine.render import render

    modality = modality_of(cfg, index)
    source = source_of(cfg, index)
    rng = np.random.default_rng([cfg.seed, index])
    mask, radius_px, mask_params = make_mask(cfg, modality, source, rng, graph_library(cfg))
    image, fov, render_params = render(modality, mask, radius_px, rng)
    meta = {
        "modality": modality,
        "source": "synthetic",
        "mask_source": source,
        "seed": cfg.seed,
        "index": index,
        "mask_params": mask_params,
        "render_params": render_params,
        "licence": "CC0-1.0 (procedurally generated)",
    }
    return Sample(image=image, mask=mask, fov=fov, meta=meta)

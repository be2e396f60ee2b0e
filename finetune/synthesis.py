"""Synthetic training pairs for a few-shot task, made by the data engine from the task's own shots (CPU).

    synth = ShotSynthesizer(shots, cfg.synthesis, names=split.train)
    sample = synth.sample(17)                      # a Sample: a pure function of (shots, config, 17)
    manifest = write_synthetic(synth, run / "synthetic")   # shards + manifest.json + preview.png

Masks keep the task's morphology because they are made from the shots' own vessel graphs
(`data_engine.graph.decompose`):
  shot        one shot's whole graph, turned a little about the image centre (or the FOV's), scaled,
              mirrored, then the morphology controls (pruning, thinning, tortuosity, elastic warp, radii);
  recombined  sub-trees of every shot's graph grafted onto one canvas (`data_engine.recombine.recombine`);
  regrowth    space colonization inside the region a shot's vessels cover, rooted where its trees are
              rooted, terminal radius from the shot's thin vessels, Murray's law towards the roots.
Each new mask is cut to its host shot's FOV and drawn into that shot's image with its vessels removed
(`data_engine.composite`): the background, illumination, noise and vessel intensity/width profile are the
task's own. The plain route (`augment`) is a geometric augmentation of a real pair instead: rotation,
scale, mirror and a smooth elastic warp applied to image and mask together.

Sample i uses `np.random.default_rng([seed, i])`, so a synthetic set can be rebuilt or extended alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data_engine import composite
from data_engine.corpus import Sample, pick
from data_engine.graph import VesselGraph, affine, decompose, render_mask
from data_engine.recombine import (
    apply_morphology,
    crop_to_canvas,
    draw_morphology,
    library_graph,
    recombine,
    region_of,
    regrow_in_region,
)
from finetune.config import SynthesisConfig

RealShot = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # (image, mask, fov or None), load_case's form
# A new mask keeping less than this share of its host's vessel area (after the FOV cut) is redrawn from
# the host's own graph: a grafted piece placed mostly outside the FOV would teach "no vessels here".
_MIN_AREA_SHARE = 0.25
# Regrowth grows on a coarse grid of this many cells on the long side (data_engine.recombine.region_of).
_REGION_CELLS = 40


@dataclass
class _Shot:
    """One real shot, prepared once: its graph, vessel-free background and vessel profile."""

    name: str
    image: np.ndarray  # uint8 HxW or HxWx3 BGR
    mask: np.ndarray  # uint8 HxW {0, 255}
    fov: np.ndarray | None  # uint8 HxW {0, 255} or None
    graph: VesselGraph  # decomposed mask, resampled and oriented (library form)
    background: np.ndarray  # the image with its labelled vessels removed
    profile: composite.VesselProfile  # intensity/width profile measured across its vessels
    vessel_area_px: int  # vessel pixels inside the FOV (count)
    terminal_radius_px: float  # 10th percentile of its centreline radii (px): how thin its twigs are

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape[0], self.mask.shape[1]

    @property
    def centre_xy(self) -> tuple[float, float]:
        """The FOV's centroid, else the image centre (px): where re-posing turns the tree about."""
        if self.fov is not None and self.fov.any():
            ys, xs = np.nonzero(self.fov)
            return float(xs.mean()), float(ys.mean())
        h, w = self.shape
        return (w - 1) / 2.0, (h - 1) / 2.0


def _as_colour(image: np.ndarray) -> np.ndarray:
    """HxW grey -> HxWx3 BGR with three equal channels; a colour image is returned as it is."""
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image


class ShotSynthesizer:
    """Makes synthetic (image, mask, fov) samples from a task's few real shots (module docstring)."""

    def __init__(
        self,
        shots: Sequence[RealShot],
        cfg: SynthesisConfig,
        names: Sequence[str] | None = None,
        modality: str = "task",
    ) -> None:
        if not shots:
            raise ValueError("synthesis needs at least one real shot")
        names = list(names) if names is not None else [f"shot{i}" for i in range(len(shots))]
        if len(names) != len(shots):
            raise ValueError(f"{len(names)} names for {len(shots)} shots")
        self.cfg = cfg
        self.modality = modality
        if len({shot[0].ndim for shot in shots}) > 1:
            # a task that mixes grey and colour files (one scanner's exports in two formats): the grey shots
            # become three equal channels, as the segmenter reads a grey image anyway, so that one vessel
            # profile is measured over every shot and any shot's background can host any shot's vessels
            shots = [(_as_colour(image), mask, fov) for image, mask, fov in shots]
        self.shots = [self._prepare(name, *shot) for name, shot in zip(names, shots, strict=True)]
        self.graphs = [s.graph for s in self.shots]
        self.profile = composite.merge_profiles([s.profile for s in self.shots])

    @staticmethod
    def _prepare(name: str, image: np.ndarray, mask: np.ndarray, fov: np.ndarray | None) -> _Shot:
        if mask.shape != image.shape[:2] or not mask.any():
            raise ValueError(f"shot {name}: mask must match the image size and hold vessel pixels")
        inside = mask > 0 if fov is None else (mask > 0) & (fov > 0)
        size = max(mask.shape)
        graph = library_graph(decompose(mask), size)
        background, profile = composite.remove_and_measure(image, mask, fov)
        radii = graph.radius_P if graph.num_points else np.array([0.7], np.float32)
        return _Shot(
            name=name,
            image=image,
            mask=mask,
            fov=fov,
            graph=graph,
            background=background,
            profile=profile,
            vessel_area_px=int(np.count_nonzero(inside)),
            terminal_radius_px=float(max(np.percentile(radii, 10), 0.5)),
        )

    def __len__(self) -> int:
        return self.cfg.num_pairs

    def __iter__(self) -> Iterator[Sample]:
        for i in range(self.cfg.num_pairs):
            yield self.sample(i)

    def pairs(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(image, mask) of every sample, what `finetune.segmenter.train_segmenter` takes."""
        for sample in self:
            yield sample.image, sample.mask

    # --- one sample ---

    def sample(self, index: int) -> Sample:
        """Sample `index`: a pure function of (shots, config, index)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, index])
        host_i = int(rng.integers(len(self.shots)))
        host = self.shots[host_i]
        route = pick(vars(cfg.routes), float(rng.random()))
        meta: dict[str, Any] = {
            "modality": self.modality,
            "source": "synthetic",
            "seed": cfg.seed,
            "index": index,
            "route": route,
            "host": host.name,
        }
        if route == "augment":
            image, mask, fov = self._augment(host, rng, meta)
        else:
            image, mask, fov = self._composite(host, rng, meta)
        return Sample(image=image, mask=mask, fov=fov, meta=meta)

    def _composite(
        self, host: _Shot, rng: np.random.Generator, meta: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        mask, radius_px, params = self._task_mask(host, rng)
        # the host's own profile: it was measured against this very background (draw_vessels adds a
        # per-sample contrast factor of its own)
        image = composite.draw_vessels(host.background, mask, radius_px, host.profile, rng, host.fov)
        meta.update({"mask_source": params.pop("source"), "params": params})
        return image, mask, host.fov

    def _task_mask(
        self, host: _Shot, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """A new mask on the host's canvas, cut to its FOV: (mask, radius_px, params with its source)."""
        source = pick(vars(self.cfg.sources), float(rng.random()))
        mask, radius_px, params = self._new_mask(host, source, rng)
        mask, radius_px = composite.clip_to_fov(mask, radius_px, host.fov)
        area = int(np.count_nonzero(mask))
        if area < _MIN_AREA_SHARE * host.vessel_area_px and source != "shot":
            params["fallback"] = f"shot ({source} kept {area} of {host.vessel_area_px} px)"
            mask, radius_px, more = self._new_mask(host, "shot", rng)
            params.update(more)
            mask, radius_px = composite.clip_to_fov(mask, radius_px, host.fov)
        if not mask.any():  # nothing left in view: the host's own vessels, re-drawn
            params["fallback"] = "host mask"
            mask = host.mask.copy()
            radius_px = _radius_map(host.mask)
        params["source"] = source
        return mask, radius_px, params

    def mask_sample(self, index: int) -> tuple[np.ndarray, np.ndarray | None, str, dict[str, Any]]:
        """Only a new mask, for images made elsewhere (the adapted generator): (mask, host FOV, host shot's
        name, params); a pure function of (shots, config, index), independent of `sample`'s draws."""
        rng = np.random.default_rng([self.cfg.seed, 1, index])
        host = self.shots[int(rng.integers(len(self.shots)))]
        mask, _radius_px, params = self._task_mask(host, rng)
        return mask, host.fov, host.name, params

    def _new_mask(
        self, host: _Shot, source: str, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        h, w = host.shape
        size = max(h, w)
        morph = draw_morphology(self.cfg.morphology, rng)
        # elastic_px is given at 512 px like the corpus's; scale it to this canvas
        morph = type(morph)(**{**vars(morph), "elastic_px": morph.elastic_px * size / 512.0})
        params: dict[str, Any] = {"morphology": morph.to_params()}
        if source == "recombined" and len(self.graphs):
            g = recombine(self.graphs, (h, w), rng, morph, params=params)
        elif source == "regrowth":
            region = region_of(host.graph, size, _REGION_CELLS)
            g = regrow_in_region(
                region,
                rng,
                branch_density=morph.branch_density,
                num_roots=morph.vessel_count,
                pixel_size=size / region.shape[0],
                terminal_radius_px=host.terminal_radius_px,
            )
            g = apply_morphology(g, rng, morph, size_px=size, thin=False)
        else:
            g = _repose(host.graph, rng, host.centre_xy, morph.rotation_deg, morph.scale)
            g = apply_morphology(g, rng, morph, size_px=size)
        g = crop_to_canvas(g, (h, w))
        mask, radius_px = render_mask(g, (h, w))
        params["num_segments"] = int(g.num_segments)
        return mask, radius_px, params

    def _augment(
        self, host: _Shot, rng: np.random.Generator, meta: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        a = self.cfg.augment
        h, w = host.shape
        angle = float(rng.uniform(-a.max_rotate_deg, a.max_rotate_deg))
        zoom = float(rng.uniform(*a.scale_range))
        mirror = bool(rng.random() < 0.5)
        elastic = a.elastic_px * max(h, w) / 512.0
        map_x, map_y = _warp_maps((h, w), host.centre_xy, angle, zoom, mirror, elastic, rng)
        image = cv2.remap(host.image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        # masks through the same map, linearly, then cut at one half: no jagged nearest-neighbour edges
        mask = _remap_binary(host.mask, map_x, map_y)
        fov = None if host.fov is None else _remap_binary(host.fov, map_x, map_y)
        if fov is not None:
            mask[fov == 0] = 0
            image = image.copy()
            image[fov == 0] = 0
        if not mask.any():
            mask, image, fov = host.mask.copy(), host.image.copy(), host.fov
        meta["params"] = {
            "rotate_deg": round(angle, 3),
            "zoom": round(zoom, 4),
            "mirror": mirror,
            "elastic_px": round(elastic, 3),
        }
        return image, mask, fov


def _radius_map(mask: np.ndarray) -> np.ndarray:
    """Approximate vessel radius at each vessel pixel of a mask: its distance to the background (px)."""
    dist = cv2.distanceTransform((mask > 0).astype(np.uint8), cv2.DIST_L2, 3)
    return np.where(mask > 0, np.maximum(dist, 0.5), 0.0).astype(np.float32)


def _repose(
    graph: VesselGraph,
    rng: np.random.Generator,
    centre_xy: tuple[float, float],
    angle_deg: float,
    factor: float,
) -> VesselGraph:
    """Rotate by angle_deg and scale by factor about centre_xy, mirroring left-right with probability 1/2."""
    if graph.num_segments == 0:
        return graph
    cx, cy = centre_xy
    m = -1.0 if rng.random() < 0.5 else 1.0
    a = math.radians(angle_deg)
    c, s = math.cos(a) * factor, math.sin(a) * factor
    lin = np.array([[c * m, s], [-s * m, c]])
    t = np.array([cx, cy]) - lin @ np.array([cx, cy])  # the centre stays put
    return affine(graph, np.column_stack([lin, t]))


def _warp_maps(
    shape: tuple[int, int],
    centre_xy: tuple[float, float],
    angle_deg: float,
    zoom: float,
    mirror: bool,
    elastic_px: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """cv2.remap maps (float32 HxW each) for rotation + zoom + mirror about centre_xy and a smooth elastic
    field of RMS elastic_px (a coarse random grid, blurred and upsampled)."""
    h, w = shape
    cx, cy = centre_xy
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    a = math.radians(angle_deg)
    c, s = math.cos(a) / zoom, math.sin(a) / zoom
    dx, dy = xs - cx, ys - cy
    if mirror:
        dx = -dx
    src_x = cx + c * dx - s * dy
    src_y = cy + s * dx + c * dy
    if elastic_px > 0:
        grid = 6
        for target in (src_x, src_y):
            coarse = rng.normal(0.0, 1.0, (grid, grid)).astype(np.float32)
            field_ = np.asarray(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC), np.float32)
            target += field_ * np.float32(elastic_px / max(float(field_.std()), 1e-6))
    return src_x.astype(np.float32), src_y.astype(np.float32)


def _remap_binary(mask: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    warped = cv2.remap(
        (mask > 0).astype(np.float32), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )
    return np.where(warped >= 0.5, np.uint8(255), np.uint8(0))


# --- writing the synthetic set ---


def write_synthetic(
    synth: ShotSynthesizer,
    out: str | Path,
    name: str = "synthetic",
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> Path:
    """Write every sample as shards + manifest.json into `out`, and `out/preview.png` (mask | synthetic |
    its host shot). Returns out. A folder whose manifest is complete is kept as it is (a resumed run)."""
    from shards.ingest import write_samples

    out = Path(out)
    write_samples(
        iter(synth),
        num_samples=len(synth),
        name=name,
        out=out,
        config={"synthesis": config or {}, "shots": [s.name for s in synth.shots]},
        modality=synth.modality,
        samples_per_shard=synth.cfg.samples_per_shard,
        png_compression=synth.cfg.png_compression,
        progress=progress,
        desc="synthesize",
    )
    preview(synth, out / "preview.png")
    return out


def preview(synth: ShotSynthesizer, path: Path, num_rows: int = 6, tile_px: int = 192) -> Path:
    """A picture of the first num_rows samples: new mask | synthetic image | the real shot it was made on."""
    samples = [synth.sample(i) for i in range(min(num_rows, len(synth)))]
    return preview_samples(samples, {s.name: s.image for s in synth.shots}, path, tile_px)


def preview_samples(
    samples: Sequence[Sample], host_images: dict[str, np.ndarray], path: Path, tile_px: int = 192
) -> Path:
    """One row per sample: mask | image | the real image of its host shot (meta "host"), labelled."""
    rows = []
    font = cv2.FONT_HERSHEY_SIMPLEX
    for sample in samples:
        host = str(sample.meta.get("host"))
        real = host_images.get(host)
        tiles = [fit_tile(sample.mask, tile_px), fit_tile(sample.image, tile_px)]
        tiles.append(fit_tile(real, tile_px) if real is not None else np.zeros_like(tiles[0]))
        label = f"{sample.meta.get('index', '')}: {sample.meta.get('route', '')}"
        if "mask_source" in sample.meta:
            label += f"/{sample.meta['mask_source']}"
        cv2.putText(tiles[0], label, (4, 14), font, 0.4, (0, 255, 255), 1, cv2.LINE_AA)
        cv2.putText(tiles[2], f"real {host}", (4, 14), font, 0.4, (0, 255, 255), 1, cv2.LINE_AA)
        gap = np.full((tile_px, 4, 3), 96, np.uint8)
        rows.append(np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1))
    if not rows:
        return path
    sep = np.full((4, rows[0].shape[1], 3), 96, np.uint8)
    picture = np.concatenate([x for r in rows for x in (r, sep)][:-1], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), picture)
    return path


def fit_tile(array: np.ndarray, size: int) -> np.ndarray:
    """A size x size BGR tile holding the whole image shrunk to fit (top-left, black around)."""
    bgr = cv2.cvtColor(array, cv2.COLOR_GRAY2BGR) if array.ndim == 2 else array
    h, w = bgr.shape[:2]
    f = size / max(h, w)
    small = cv2.resize(bgr, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    tile = np.zeros((size, size, 3), np.uint8)
    tile[: small.shape[0], : small.shape[1]] = small
    return tile

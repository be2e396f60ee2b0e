"""Look at a built corpus: `univg shards verify | preview | stats DIR`.

report = verify_corpus("data/shards/tiny")      # sha256, sizes, every sample decoded and checked
preview_corpus("data/shards/tiny", "grid.png")   # rows per modality of mask | image pairs
table = corpus_stats("data/shards/tiny")         # per modality: count, vessel fraction, intensity, bytes
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data_engine import MODALITIES
from data_engine.corpus import Sample
from shards.manifest import Manifest, load_manifest
from shards.schema import (
    KEY_RE,
    MEMBERS,
    SampleError,
    ShardError,
    decode_sample,
    iter_samples_bytes,
)
from shards.writer import SHARD_RE, ShardRecord

# --- verify ---


@dataclass
class VerifyReport:
    """Outcome of verifying a corpus folder against its manifest."""

    folder: Path  # corpus folder
    num_shards: int  # shards listed in the manifest (count)
    num_samples: int  # samples decoded and checked in good shards (count)
    bad_shards: dict[str, str] = field(default_factory=dict)  # shard file -> first problem found
    notes: list[str] = field(default_factory=list)  # corpus-level findings that are not failures

    @property
    def ok(self) -> bool:
        return not self.bad_shards


def verify_shard(folder: Path, record: ShardRecord, corpus: str) -> tuple[str, str | None, int]:
    """(shard name, first problem or None, samples checked): size, sha256, tar structure, every sample."""
    path = folder / record.name
    if not path.is_file():
        return record.name, "missing", 0
    data = path.read_bytes()
    if len(data) != record.num_bytes:
        return record.name, f"{len(data)} bytes, manifest says {record.num_bytes} (truncated?)", 0
    if hashlib.sha256(data).hexdigest() != record.sha256:
        return record.name, "sha256 differs from the manifest (corrupt or rewritten)", 0
    counts: dict[str, int] = {}
    last_key = ""
    num = 0
    try:
        for key, members in iter_samples_bytes(data, record.name):
            m = KEY_RE.match(key)
            if not m or m.group("corpus") != corpus:
                raise SampleError(f"key {key!r} is not {corpus}_<index:09d>")
            if key <= last_key:
                raise SampleError(f"key {key!r} out of order after {last_key!r}")
            unknown = sorted(set(members) - set(MEMBERS))
            if unknown:
                raise SampleError(f"{key}: unknown member(s) {unknown}")
            sample = decode_sample(key, members)
            modality = str(sample.meta["modality"])
            counts[modality] = counts.get(modality, 0) + 1
            last_key = key
            num += 1
    except (ShardError, SampleError) as e:
        return record.name, str(e), num
    if num != record.num_samples:
        return record.name, f"{num} samples, manifest says {record.num_samples}", num
    if counts != record.modalities:
        return record.name, f"modality counts {counts} differ from the manifest's {record.modalities}", num
    return record.name, None, num


def _verify_task(args: tuple[Path, ShardRecord, str]) -> tuple[str, str | None, int]:
    cv2.setNumThreads(1)
    return verify_shard(*args)


def verify_corpus(folder: str | Path, num_workers: int = 1, progress: bool = True) -> VerifyReport:
    """Check every shard in the folder's manifest; bad shards are named, never raised."""
    from tqdm import tqdm

    if num_workers < 1:
        raise ValueError(f"--workers={num_workers} must be >= 1")
    folder = Path(folder)
    manifest = load_manifest(folder)
    report = VerifyReport(folder=folder, num_shards=len(manifest.shards), num_samples=0)
    tasks = [(folder, r, manifest.corpus) for r in manifest.shards]
    bar = tqdm(total=len(tasks), unit="shard", desc=f"verify {manifest.corpus}", disable=not progress)
    if num_workers > 1 and len(tasks) > 1:
        with mp.get_context("spawn").Pool(min(num_workers, len(tasks))) as pool:
            results = list(_with_bar(pool.imap_unordered(_verify_task, tasks), bar))
    else:
        results = list(_with_bar((verify_shard(*t) for t in tasks), bar))
    bar.close()
    for name, problem, num in sorted(results):
        if problem is None:
            report.num_samples += num
        else:
            report.bad_shards[name] = problem
    listed = {r.name for r in manifest.shards}
    extra = sorted(
        p.name
        for p in folder.iterdir()
        if (m := SHARD_RE.match(p.name)) and m["corpus"] == manifest.corpus and p.name not in listed
    )
    if extra:
        report.notes.append(f"{len(extra)} shard file(s) not in the manifest, ignored (first: {extra[0]})")
    return report


def _with_bar(items: Any, bar: Any) -> Iterator[Any]:
    for item in items:
        bar.update(1)
        yield item


# --- reading samples in corpus order ---


def iter_corpus(folder: Path, manifest: Manifest) -> Iterator[tuple[str, Sample, dict[str, bytes]]]:
    """(key, decoded sample, raw members) of every sample, shard by shard, in order."""
    for record in manifest.shards:
        data = (folder / record.name).read_bytes()
        for key, members in iter_samples_bytes(data, record.name):
            yield key, decode_sample(key, members), members


def _modality_order(names: Any) -> list[str]:
    known = [m for m in MODALITIES if m in names]
    return known + sorted(set(names) - set(MODALITIES))


# --- preview ---


def _tile(array: np.ndarray, size_px: int) -> np.ndarray:
    bgr = cv2.cvtColor(array, cv2.COLOR_GRAY2BGR) if array.ndim == 2 else array
    return cv2.resize(bgr, (size_px, size_px), interpolation=cv2.INTER_AREA)


def preview_corpus(
    folder: str | Path, out: str | Path, per_modality: int = 4, tile_px: int = 128
) -> tuple[int, int]:
    """Write a grid picture: one row per modality of `per_modality` mask | image pairs. Returns (h, w)."""
    if per_modality < 1 or tile_px < 16:
        raise ValueError(f"--per-modality={per_modality} must be >= 1 and tile size {tile_px} >= 16")
    folder = Path(folder)
    manifest = load_manifest(folder)
    order = _modality_order(manifest.modalities)
    picked: dict[str, list[Sample]] = {m: [] for m in order}
    for _key, sample, _members in iter_corpus(folder, manifest):
        row = picked.setdefault(str(sample.meta["modality"]), [])
        if len(row) < per_modality:
            row.append(sample)
        if all(len(v) >= min(per_modality, manifest.modalities.get(k, 0)) for k, v in picked.items()):
            break
    gap, label_w, header_h = 4, 120, 28
    pair_w = 2 * tile_px + gap
    width = label_w + per_modality * (pair_w + 2 * gap)
    height = header_h + len(picked) * (tile_px + gap)
    canvas = np.full((height, width, 3), 32, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    title = f"{manifest.corpus}: {manifest.num_samples} pairs   (each pair: mask | image)"
    cv2.putText(canvas, title, (6, 19), font, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    for r, (modality, samples) in enumerate(picked.items()):
        y = header_h + r * (tile_px + gap)
        cv2.putText(canvas, modality, (6, y + tile_px // 2), font, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
        count = f"n={manifest.modalities.get(modality, 0)}"
        cv2.putText(canvas, count, (6, y + tile_px // 2 + 20), font, 0.45, (180, 180, 180), 1, cv2.LINE_AA)
        for c, sample in enumerate(samples):
            x = label_w + c * (pair_w + 2 * gap)
            canvas[y : y + tile_px, x : x + tile_px] = _tile(sample.mask, tile_px)
            canvas[y : y + tile_px, x + tile_px + gap : x + pair_w] = _tile(sample.image, tile_px)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), canvas):
        raise ValueError(
            f"could not write {out} (the suffix must be an image format OpenCV writes, e.g. .png)"
        )
    return height, width


# --- stats ---


@dataclass
class _Acc:
    num: int = 0
    vessel_fraction: float = 0.0
    fov_fraction: float = 0.0
    num_fov: int = 0
    pixel_sum: float = 0.0
    pixel_sq_sum: float = 0.0
    num_pixels: int = 0
    member_bytes: dict[str, int] = field(default_factory=dict)


def corpus_stats(folder: str | Path, max_samples: int | None = None) -> dict[str, Any]:
    """Per modality: samples (manifest and examined), mean vessel fraction, mean FOV fraction, image
    intensity mean/std (0-255, all pixels and channels), mean bytes per member; plus corpus totals."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    accs: dict[str, _Acc] = {}
    for num, (_key, sample, members) in enumerate(iter_corpus(folder, manifest)):
        if max_samples is not None and num >= max_samples:
            break
        a = accs.setdefault(str(sample.meta["modality"]), _Acc())
        a.num += 1
        a.vessel_fraction += np.count_nonzero(sample.mask) / sample.mask.size
        if sample.fov is not None:
            a.fov_fraction += np.count_nonzero(sample.fov) / sample.fov.size
            a.num_fov += 1
        pixels = sample.image.astype(np.float64)
        a.pixel_sum += float(pixels.sum())
        a.pixel_sq_sum += float(np.square(pixels).sum())
        a.num_pixels += pixels.size
        for suffix, data in members.items():
            a.member_bytes[suffix] = a.member_bytes.get(suffix, 0) + len(data)
    modalities: dict[str, Any] = {}
    for name in _modality_order(set(accs) | set(manifest.modalities)):
        a = accs.get(name, _Acc())
        n = max(a.num, 1)
        mean = a.pixel_sum / max(a.num_pixels, 1)
        modalities[name] = {
            "num_samples": manifest.modalities.get(name, 0),
            "num_examined": a.num,
            "vessel_fraction": a.vessel_fraction / n,
            "fov_fraction": a.fov_fraction / a.num_fov if a.num_fov else None,
            "intensity_mean": mean,
            "intensity_std": float(np.sqrt(max(a.pixel_sq_sum / max(a.num_pixels, 1) - mean * mean, 0.0))),
            "bytes_per_sample": {k: v / n for k, v in sorted(a.member_bytes.items())},
        }
    return {
        "corpus": manifest.corpus,
        "num_samples": manifest.num_samples,
        "num_shards": len(manifest.shards),
        "num_bytes": manifest.num_bytes,
        "bytes_per_sample": manifest.num_bytes / max(manifest.num_samples, 1),
        "modalities": modalities,
    }


def format_stats(stats: dict[str, Any]) -> str:
    """The stats dict as a fixed-width table."""
    lines = [
        f"corpus {stats['corpus']}: {stats['num_samples']} samples, {stats['num_shards']} shards, "
        f"{stats['num_bytes'] / 1e6:.1f} MB, {stats['bytes_per_sample'] / 1e3:.1f} kB/sample (tar)",
        f"{'modality':<10} {'samples':>8} {'examined':>8} {'vessel%':>8} {'fov%':>6} {'mean':>6} {'std':>6} "
        f"{'image kB':>9} {'mask kB':>8}",
    ]
    for name, s in stats["modalities"].items():
        fov = "-" if s["fov_fraction"] is None else f"{100 * s['fov_fraction']:.1f}"
        b = s["bytes_per_sample"]
        lines.append(
            f"{name:<10} {s['num_samples']:>8} {s['num_examined']:>8} {100 * s['vessel_fraction']:>8.2f} "
            f"{fov:>6} {s['intensity_mean']:>6.1f} {s['intensity_std']:>6.1f} "
            f"{b.get('image.png', 0) / 1e3:>9.1f} {b.get('mask.png', 0) / 1e3:>8.1f}"
        )
    return "\n".join(lines)

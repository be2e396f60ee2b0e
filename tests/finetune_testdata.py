"""Tiny on-disk tasks for the finetune tests: synthetic vessel images with masks and a manifest CSV."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def vessel_pair(
    rng: np.random.Generator, height: int, width: int, colour: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A dark image with a few bright lines (the vessels) and noise; mask uint8 {0, 255}."""
    mask = np.zeros((height, width), np.uint8)
    for _ in range(3):
        p0 = (int(rng.integers(width)), int(rng.integers(height)))
        p1 = (int(rng.integers(width)), int(rng.integers(height)))
        cv2.line(mask, p0, p1, 255, thickness=int(rng.integers(1, 4)))
    if not mask.any():
        mask[height // 2, :] = 255
    base = rng.normal(60, 12, (height, width)).clip(0, 255)
    grey = np.where(mask > 0, 170.0, base).astype(np.uint8)
    if not colour:
        return grey, mask
    image = np.stack([grey // 3, grey, (grey // 2 + 20).astype(np.uint8)], axis=2).astype(np.uint8)
    return image, mask


def write_task(
    root: Path,
    splits: list[str],
    size: tuple[int, int] = (40, 48),
    colour: bool = False,
    with_fov: bool = False,
    seed: int = 0,
) -> Path:
    """Write `case_<i>` images/masks (and fovs) under root with one manifest row per split entry; returns
    the CSV path."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "fov"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = ["image,mask,fov,split"]
    for i, split in enumerate(splits):
        image, mask = vessel_pair(rng, size[0], size[1], colour)
        cv2.imwrite(str(root / "images" / f"case_{i:02d}.png"), image)
        cv2.imwrite(str(root / "masks" / f"case_{i:02d}_gt.png"), mask)
        fov = ""
        if with_fov:
            disc = np.zeros(size, np.uint8)
            cv2.ellipse(disc, (size[1] // 2, size[0] // 2), (size[1] // 2, size[0] // 2), 0, 0, 360, 255, -1)
            cv2.imwrite(str(root / "fov" / f"case_{i:02d}.png"), disc)
            fov = f"fov/case_{i:02d}.png"
        rows.append(f"images/case_{i:02d}.png,masks/case_{i:02d}_gt.png,{fov},{split}")
    csv = root / "pairs.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def collimated_pair(rng: np.random.Generator, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Dark vessels in a bright round field with a dark, flat outside that the mask does not mark (an image
    intensifier's, as X-ray angiography shows): grey uint8 image and uint8 {0, 255} mask."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size * rng.uniform(0.4, 0.6), size * rng.uniform(0.4, 0.6)
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size * 0.4) ** 2
    mask = np.zeros((size, size), np.uint8)
    for _ in range(3):
        p0 = (int(rng.integers(size // 4, 3 * size // 4)), int(rng.integers(size // 4, 3 * size // 4)))
        p1 = (int(rng.integers(size // 4, 3 * size // 4)), int(rng.integers(size // 4, 3 * size // 4)))
        cv2.line(mask, p0, p1, 255, thickness=int(rng.integers(2, 4)))
    mask[~inside] = 0
    if not mask.any():
        mask[int(cy), int(cx) - 5 : int(cx) + 5] = 255
    image = np.where(inside, rng.normal(150, 6, (size, size)), rng.normal(15, 1, (size, size)))
    return np.where(mask > 0, 70.0, image).clip(0, 255).astype(np.uint8), mask


def write_collimated_task(root: Path, splits: list[str], size: int = 96, seed: int = 0) -> Path:
    """A task of collimated_pair images named `coll_<i>`, no FOV column; returns the CSV."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = ["image,mask,fov,split"]
    for i, split in enumerate(splits):
        image, mask = collimated_pair(rng, size)
        rows.append(_save_case(root, f"coll_{i}", image, mask, split))
    return _save_manifest(root, rows)


def write_lumen_task(
    root: Path, splits: list[str], size: tuple[int, int] = (120, 140), seed: int = 0
) -> Path:
    """A task of one wide, dark, near-round lumen per image on a speckled background (a vessel cut across,
    as ultrasound shows a carotid), named `lumen_<i>`; returns the manifest CSV path."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    h, w = size
    rows = ["image,mask,fov,split"]
    for i, split in enumerate(splits):
        mask = np.zeros(size, np.uint8)
        radius = int(rng.integers(14, 25))
        centre = (
            int(rng.integers(radius + 4, w - radius - 4)),
            int(rng.integers(radius + 4, h - radius - 4)),
        )
        axes = (radius, int(radius * rng.uniform(0.8, 1.0)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        speckle = cv2.GaussianBlur(rng.rayleigh(1.0, size).astype(np.float32), (0, 0), 1.0)
        lumen = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), 1.0)
        image = np.clip(120 * speckle * (1 - 0.85 * lumen), 0, 255).astype(np.uint8)
        rows.append(_save_case(root, f"lumen_{i:02d}", image, mask, split))
    return _save_manifest(root, rows)


def _save_case(root: Path, stem: str, image: np.ndarray, mask: np.ndarray, split: str) -> str:
    """Write images/<stem>.png and masks/<stem>.png under root; returns its manifest row (no FOV)."""
    cv2.imwrite(str(root / "images" / f"{stem}.png"), image)
    cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask)
    return f"images/{stem}.png,masks/{stem}.png,,{split}"


def _save_manifest(root: Path, rows: list[str]) -> Path:
    """root/pairs.csv holding rows (the header first); returns its path."""
    csv = root / "pairs.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv

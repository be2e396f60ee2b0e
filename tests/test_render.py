"""data_engine.render: layouts, contrast direction and strength, fields of view, determinism."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_engine import MODALITIES
from data_engine.render import MODALITIES_WITH_FOV, render

SIZE = 128
THICK_X, THIN_X = 44, 92  # columns of a thick (r = 6 px) and a thin (r = 1 px) vertical vessel
ROWS = slice(34, 94)  # rows compared, away from the vessel ends
DARK_VESSELS = {"fundus": True, "xca": True, "dsa": True, "octa": False, "mra": False}


def two_vessels(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Mask and radius map of one thick and one thin vertical vessel."""
    mask = np.zeros((size, size), np.uint8)
    radius_px = np.zeros((size, size), np.float32)
    for x, r in ((THICK_X, 6.0), (THIN_X, 1.0)):
        cv2.line(mask, (x, 20), (x, size - 20), 255, int(2 * r))
        cv2.line(radius_px, (x, 20), (x, size - 20), r, int(2 * r))
    return mask, radius_px


def tree(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A small random branching tree (mask, radius map), drawn thickest last."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.uint8)
    radius_px = np.zeros((size, size), np.float32)
    stack, segments = [(size / 2, size - 4.0, -np.pi / 2, 4.0)], []
    while stack:
        x, y, a, r = stack.pop()
        if r < 0.9:
            continue
        x2, y2 = x + np.cos(a) * r * 6, y + np.sin(a) * r * 6
        segments.append((r, (round(x), round(y)), (round(x2), round(y2))))
        stack += [(x2, y2, a + rng.uniform(0.3, 0.7), r * 0.8), (x2, y2, a - rng.uniform(0.3, 0.7), r * 0.8)]
    for r, p, q in sorted(segments):
        cv2.line(mask, p, q, 255, max(1, round(2 * r)))
        cv2.line(radius_px, p, q, float(r), max(1, round(2 * r)))
    radius_px[mask == 0] = 0
    return mask, radius_px


def luminance(image: np.ndarray) -> np.ndarray:
    """Grey as is; for fundus the green channel, where vessels show most (as ophthalmologists use it)."""
    return (image[..., 1] if image.ndim == 3 else image).astype(np.float64)


def contrast(image: np.ndarray, x: int, half_width: int) -> float:
    """Mean vessel-centre intensity minus the mean of the background on both sides (12 px further out)."""
    lum = luminance(image)
    centre = lum[ROWS, x - 1 : x + 1].mean()
    off = half_width + 12
    background = np.concatenate([lum[ROWS, x - off - 2 : x - off + 2], lum[ROWS, x + off - 2 : x + off + 2]])
    return float(centre - background.mean())


@pytest.mark.parametrize("modality", MODALITIES)
def test_layout_dtype_and_fov(modality: str) -> None:
    mask, radius_px = tree(96, 1)
    image, fov, params = render(modality, mask, radius_px, np.random.default_rng(0))
    assert image.dtype == np.uint8
    assert image.shape == ((96, 96, 3) if modality == "fundus" else (96, 96))
    assert params["modality"] == modality
    json.dumps(params)  # JSON-serialisable, as meta.json needs
    if modality in MODALITIES_WITH_FOV:
        assert fov is not None and fov.dtype == np.uint8 and fov.shape == (96, 96)
        assert set(np.unique(fov)) <= {0, 255} and fov.any()
        outside = fov == 0
        assert not image[outside].any()  # black outside the field of view
    else:
        assert fov is None


def test_fov_exactly_for_fundus_and_dsa() -> None:
    assert set(MODALITIES_WITH_FOV) == {"fundus", "dsa"}


@pytest.mark.parametrize("modality", MODALITIES)
def test_vessel_direction_and_thick_beats_thin(modality: str) -> None:
    mask, radius_px = two_vessels()
    sign = -1.0 if DARK_VESSELS[modality] else 1.0
    for seed in range(3):
        image, _, _ = render(modality, mask, radius_px, np.random.default_rng(seed))
        thick = sign * contrast(image, THICK_X, 6)
        thin = sign * contrast(image, THIN_X, 1)
        assert thin > 2.0, f"{modality} seed {seed}: thin vessel contrast {thin:.1f} grey levels"
        assert thick > thin + 5.0, f"{modality} seed {seed}: thick {thick:.1f} vs thin {thin:.1f}"


@pytest.mark.parametrize("modality", MODALITIES)
def test_same_seed_same_bytes_other_seed_differs(modality: str) -> None:
    mask, radius_px = tree(80, 2)
    a, fov_a, params_a = render(modality, mask, radius_px, np.random.default_rng([5, 17]))
    b, fov_b, params_b = render(modality, mask, radius_px, np.random.default_rng([5, 17]))
    c, _, _ = render(modality, mask, radius_px, np.random.default_rng([5, 18]))
    assert a.tobytes() == b.tobytes()
    assert (fov_a is None and fov_b is None) or (
        fov_a is not None and fov_b is not None and fov_a.tobytes() == fov_b.tobytes()
    )
    assert params_a == params_b
    assert a.tobytes() != c.tobytes()


def _digests(size: int) -> dict[str, str]:
    mask, radius_px = tree(size, 3)
    return {
        m: hashlib.sha256(render(m, mask, radius_px, np.random.default_rng([9, 1]))[0].tobytes()).hexdigest()
        for m in MODALITIES
    }


def test_same_seed_same_bytes_in_a_fresh_process() -> None:
    """Tiles are rebuilt from constant seeds in a new process: the images must not change."""
    here = _digests(72)
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2]); "
        "import test_render; print(json.dumps(test_render._digests(72)))"
    )
    tests_dir = Path(__file__).resolve().parent
    out = subprocess.run(
        [sys.executable, "-c", code, str(tests_dir.parent), str(tests_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


@pytest.mark.parametrize("modality", MODALITIES)
def test_empty_mask_and_non_square_canvas(modality: str) -> None:
    image, fov, _ = render(
        modality, np.zeros((40, 70), np.uint8), np.zeros((40, 70), np.float32), np.random.default_rng(0)
    )
    assert image.shape[:2] == (40, 70)
    assert fov is None or fov.shape == (40, 70)


def test_radius_map_of_zeros_still_renders_vessels() -> None:
    """A missing radius map falls back to the mask's own depth: vessels stay visible."""
    mask, _ = two_vessels()
    image, _, _ = render("dsa", mask, np.zeros(mask.shape, np.float32), np.random.default_rng(0))
    assert -contrast(image, THICK_X, 6) > 10


def test_bad_inputs_raise_with_what_is_wrong() -> None:
    mask, radius_px = two_vessels(32)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown modality 'ultrasound'.*fundus, xca, dsa, octa, mra"):
        render("ultrasound", mask, radius_px, rng)
    with pytest.raises(ValueError, match="mask must be an HxW uint8"):
        render("xca", mask.astype(np.float32), radius_px, rng)
    with pytest.raises(ValueError, match="radius_px must be a float array"):
        render("xca", mask, radius_px[:, :10], rng)
    with pytest.raises(ValueError, match="at least 8x8"):
        render("xca", mask[:4], radius_px[:4], rng)

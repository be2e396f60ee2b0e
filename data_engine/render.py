"""Appearance of the built-in modalities: vessel mask + radii -> image, field of view, drawn parameters.

    image, fov, params = render("fundus", mask, radius_px, np.random.default_rng([seed, i]))

Layouts: `mask` HxW uint8 (non-zero = vessel), `radius_px` HxW float32 (vessel radius at each vessel pixel,
in pixels, 0 elsewhere), `image` HxWx3 uint8 BGR (fundus) or HxW uint8 (the grey modalities), `fov` HxW
uint8 {0, 255} or None.

Vessel contrast follows a tube model: at a vessel pixel at depth e from the vessel's edge, the chord through
a cylinder of radius r is 2 * sqrt(e' * (2r - e')) with e' = e - 0.5 px (the pixel centre). Beer-Lambert
absorption exp(-mu * chord) then makes wide vessels darker (or brighter) than capillaries, with rounded
profiles and soft edges. Smooth anatomy (optic disc, heart shadow, skull haze, ...) is computed on a grid
`_LOWRES_FACTOR` times coarser and upsampled; per-pixel texture and noise come from per-process tiles
(`_tile`), built once from constant seeds, of which each sample takes a random crop.

Speed (the 58,689-sample corpus must build in minutes on 2 cores): at 512 px a call costs a few ms on one
core (`benchmarks/bench_render.py`). Everything is float32, full-image work goes through OpenCV, and no
full-size random numbers are drawn per sample (numpy needs ~3 ms for 512x512 normals alone).

Determinism: the output is a pure function of (modality, mask, radius_px, rng state); no global RNG, tiles
seeded by constants, so a seed gives byte-identical images in any process on the same machine. Every
value drawn from `rng` is recorded in `params` (JSON-serialisable).
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from data_engine import MODALITIES

# Smooth fields (illumination, anatomy) are computed on a grid this many times coarser, then upsampled.
_LOWRES_FACTOR = 8
# Texture / noise tiles are at least this big (px), so a 512 px sample has 513^2 possible crops of each.
_MIN_TILE_PX = 1024
# Seed of the per-process tiles: a constant, so every process builds the same tiles.
_TILE_SEED = 20250917

Params = dict[str, Any]


_ALLOCATOR_TUNED = False


def _keep_freed_memory() -> None:
    """Stop glibc from handing every freed 1-3 MB temporary straight back to the OS.

    By default glibc serves blocks over 128 KiB with fresh mmap()s and trims freed heap memory, so each
    full-frame temporary of a render is page-faulted in again: measured 2-4x slower renders at 512 px.
    Raising the mmap and trim thresholds once per process makes the temporaries reuse warm memory. It
    only changes when memory goes back to the OS, never what is computed. Linux/glibc only; a no-op
    elsewhere.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD (32 MiB: glibc's maximum on 64-bit)
        libc.mallopt(-1, 256 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl, ...): keep the defaults
        pass


# ---------------------------------------------------------------------------------------------------------
# Drawing parameters: every value taken from rng goes through these, so params records all of them.


def _uniform(rng: np.random.Generator, params: Params, name: str, low: float, high: float) -> float:
    value = float(rng.uniform(low, high))
    params[name] = value
    return value


def _chance(rng: np.random.Generator, params: Params, name: str, probability: float) -> bool:
    value = bool(rng.random() < probability)
    params[name] = value
    return value


def _smooth_lowres(
    rng: np.random.Generator, params: Params, name: str, shape_lr: tuple[int, int], cells: int
) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field on the low-res grid: `cells` x `cells` normals, bicubic."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    params[name] = [round(float(v), 6) for v in coarse.ravel()]
    return cv2.resize(coarse, (shape_lr[1], shape_lr[0]), interpolation=cv2.INTER_CUBIC)


# ---------------------------------------------------------------------------------------------------------
# Per-process tiles of texture and noise, built once from constant seeds.

_TILES: dict[tuple[str, int], np.ndarray] = {}


def _normalised(field: np.ndarray) -> np.ndarray:
    field = field - field.mean()
    return (field / max(float(field.std()), 1e-6)).astype(np.float32)


def _blurred_normals(seed: int, size: int, sigma_px: float) -> np.ndarray:
    normals = np.random.default_rng([_TILE_SEED, seed]).standard_normal((size, size), dtype=np.float32)
    return cv2.GaussianBlur(normals, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT)


def _build_tile(name: str, size: int) -> np.ndarray:
    if name in ("normal_a", "normal_b"):  # white N(0, 1)
        return np.random.default_rng([_TILE_SEED, 1 if name == "normal_a" else 2]).standard_normal(
            (size, size), dtype=np.float32
        )
    if name == "grain":  # N(0, 1) with ~1 px correlation: X-ray quantum noise after the detector's blur
        return _normalised(_blurred_normals(3, size, 0.8))
    if name == "mottle":  # unit-variance mix of 2 px and 8 px blobs: choroid, brain parenchyma
        fine = _normalised(_blurred_normals(4, size, 2.0))
        coarse = _normalised(_blurred_normals(5, size, 8.0))
        return _normalised(0.5 * fine + coarse)
    if name == "fundus_grain":
        # Log-intensity texture + noise per channel (B, G, R): the choroid's mottling shows most in red;
        # sensor noise is independent per channel and strongest in the dim blue one.
        texture = _build_tile("mottle", size)
        channels = [
            0.055 * weight * texture + noise * _blurred_normals(11 + c, size, 0.5)
            for c, (weight, noise) in enumerate(((0.5, 0.03), (0.8, 0.018), (1.0, 0.015)))
        ]
        return np.stack(channels)
    if name == "capillary":
        # The zero set of band-limited noise is a closed, maze-like net of lines: a capillary bed. A fine
        # net (capillaries) plus a sparser, coarser one (arterioles, venules), with patchy density.
        def net(seed: int, sigma_px: float, width: float) -> np.ndarray:
            band = _blurred_normals(seed, size, sigma_px) - _blurred_normals(seed, size, 2 * sigma_px)
            band /= max(float(band.std()), 1e-6)
            return np.exp(-((band / width) ** 2))

        bed = cv2.GaussianBlur(0.75 * net(6, 1.6, 0.5) + 0.45 * net(10, 3.5, 0.35), (0, 0), 0.6)
        bed *= np.clip(0.85 + 0.2 * _normalised(_blurred_normals(7, size, 12.0)), 0.3, 1.3)
        return (bed / bed.max()).astype(np.float32)
    if name == "speckle":
        # Fully developed speckle: |complex Gaussian|^2, exponential with mean 1, grain ~1.5 px.
        re = _normalised(_blurred_normals(8, size, 0.7))
        im = _normalised(_blurred_normals(9, size, 0.7))
        return (0.5 * (re * re + im * im)).astype(np.float32)
    raise KeyError(name)


def _tile(name: str, shape: tuple[int, int]) -> np.ndarray:
    """The tile `name` (SxS, or CxSxS planar), big enough to crop `shape` from; built on first use, cached."""
    need = max(shape)
    size = _MIN_TILE_PX if need <= _MIN_TILE_PX // 2 else 2 * need
    key = (name, size)
    if key not in _TILES:
        _TILES[key] = _build_tile(name, size)
    return _TILES[key]


def _crop(name: str, shape: tuple[int, int], rng: np.random.Generator, params: Params) -> np.ndarray:
    """A random shape-sized window (a view, no copy) of the tile `name` (SxS, or CxSxS planar: every plane
    cropped at the same place); the offset goes into params."""
    tile = _tile(name, shape)
    y = int(rng.integers(0, tile.shape[-2] - shape[0] + 1))
    x = int(rng.integers(0, tile.shape[-1] - shape[1] + 1))
    params.setdefault("tile_offsets_px", {})[name] = [y, x]
    return tile[..., y : y + shape[0], x : x + shape[1]]


# ---------------------------------------------------------------------------------------------------------
# Geometry helpers on the low-res grid (coordinates in full-resolution pixels).

_GRIDS: dict[tuple[tuple[int, int], int], tuple[np.ndarray, np.ndarray]] = {}


def _lowres_shape(shape: tuple[int, int], factor: int) -> tuple[int, int]:
    return max(4, -(-shape[0] // factor)), max(4, -(-shape[1] // factor))


def _grid(shape: tuple[int, int], factor: int = _LOWRES_FACTOR) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) of the cell centres of a grid `factor` times coarser, in full-resolution pixel coordinates
    (as cv2.resize maps them)."""
    if (shape, factor) not in _GRIDS:
        h_lr, w_lr = _lowres_shape(shape, factor)
        ys = ((np.arange(h_lr, dtype=np.float32) + 0.5) * (shape[0] / h_lr) - 0.5).astype(np.float32)
        xs = ((np.arange(w_lr, dtype=np.float32) + 0.5) * (shape[1] / w_lr) - 0.5).astype(np.float32)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        _GRIDS[shape, factor] = (yy, xx)
    return _GRIDS[shape, factor]


def _upsample(field_lr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return cv2.resize(field_lr, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _ellipse_inside(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float, soft_px: float
) -> np.ndarray:
    """1 inside the rotated ellipse, 0 outside, with a smooth edge about `soft_px` wide."""
    c, s = math.cos(angle), math.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    return _smoothstep((1.0 - rho) * min(rx, ry) / max(soft_px, 1e-3) + 0.5)


def _vessel_density_lr(radius_px: np.ndarray, factor: int = _LOWRES_FACTOR) -> np.ndarray:
    """Low-res map of vessel 'mass' (cell mean of radius, squared: wide vessels dominate)."""
    h_lr, w_lr = _lowres_shape(radius_px.shape, factor)
    mean_r = cv2.resize(radius_px, (w_lr, h_lr), interpolation=cv2.INTER_AREA)
    return mean_r * mean_r


def _argmax_yx(field: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> tuple[float, float]:
    k = int(np.argmax(field))
    return float(yy.flat[k]), float(xx.flat[k])


def _covering_radius(density_lr: np.ndarray, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float) -> float:
    """Distance from (cy, cx) to the farthest low-res cell that holds vessel, plus one cell."""
    occupied = density_lr > 0
    if not occupied.any():
        return 0.0
    d = np.sqrt((yy[occupied] - cy) ** 2 + (xx[occupied] - cx) ** 2)
    cell = float(yy[1, 0] - yy[0, 0]) if yy.shape[0] > 1 else 1.0
    return float(d.max()) + cell


# ---------------------------------------------------------------------------------------------------------
# Vessels.


def _chord_px(mask: np.ndarray, radius_px: np.ndarray) -> np.ndarray:
    """Path length (px) through the vessel at each pixel, tube model (module docstring); 0 outside."""
    depth = cv2.distanceTransform(mask, cv2.DIST_L2, 3)  # 1 at the rim pixel, 0 outside the vessel
    np.subtract(depth, 0.5, out=depth)
    np.maximum(depth, 0.0, out=depth)
    # A pixel deeper than its recorded radius (radius map too small or missing) is taken at face value.
    radius = cv2.max(radius_px, depth)
    two_r_minus_e = cv2.addWeighted(radius, 2.0, depth, -1.0, 0.0)
    chord = cv2.multiply(two_r_minus_e, depth, scale=4.0)
    return cv2.sqrt(chord)


def _optics_blur(field: np.ndarray, sigma_px: float) -> np.ndarray:
    """The imaging system's point spread, Gaussian with sigma_px (kernel cut at 2 sigma)."""
    ksize = 2 * math.ceil(2.0 * sigma_px) + 1
    return cv2.GaussianBlur(field, (ksize, ksize), sigma_px)


def _draw_catheter(chord: np.ndarray, radius_px: np.ndarray, rng: np.random.Generator, p: Params) -> None:
    """A contrast-filled catheter from an image border to the widest vessel pixel, drawn into `chord`.

    It is not a vessel, so it stays out of the mask (as in real annotations).
    """
    h, w = chord.shape
    tip = int(np.argmax(radius_px))
    tip_y, tip_x = divmod(tip, w)
    widest = float(radius_px.flat[tip])
    side = int(rng.integers(0, 4))
    p["catheter_entry_side"] = side  # 0 top, 1 right, 2 bottom, 3 left
    along = _uniform(rng, p, "catheter_entry_along", 0.15, 0.85)
    bend = _uniform(rng, p, "catheter_bend", -0.35, 0.35)
    radius = max(1.2, widest * _uniform(rng, p, "catheter_radius_ratio", 0.45, 0.7))
    fill = _uniform(rng, p, "catheter_fill", 0.7, 1.0)
    start = [(along * w, -5.0), (w + 5.0, along * h), (along * w, h + 5.0), (-5.0, along * h)][side]
    dx, dy = tip_x - start[0], tip_y - start[1]
    ctrl = (start[0] + 0.5 * dx - bend * dy, start[1] + 0.5 * dy + bend * dx)
    t = np.linspace(0.0, 1.0, 32)[:, None]
    pts = (1 - t) ** 2 * np.array(start) + 2 * (1 - t) * t * np.array(ctrl) + t**2 * np.array([tip_x, tip_y])
    cv2.polylines(
        chord,
        [np.round(pts).astype(np.int32)],
        False,
        2.0 * radius * fill,
        thickness=max(1, round(2 * radius)),
    )


def _to_uint8(image01: np.ndarray) -> np.ndarray:
    """[0, 1] float32 -> uint8, rounded and saturated; negative values (noise) clamp to 0, in place."""
    np.maximum(image01, 0.0, out=image01)  # convertScaleAbs would mirror them instead
    return cv2.convertScaleAbs(image01, alpha=255.0)


# ---------------------------------------------------------------------------------------------------------
# The five modalities. Each takes the checked inputs and a params dict to fill, and returns (image, fov).


def _fov_disc(shape: tuple[int, int], cy: float, cx: float, radius: float) -> np.ndarray:
    fov = np.zeros(shape, np.uint8)
    cv2.circle(fov, (round(cx), round(cy)), round(radius), 255, thickness=-1)
    return fov


def _render_fundus(
    mask: np.ndarray, radius_px: np.ndarray, rng: np.random.Generator, p: Params
) -> tuple[np.ndarray, np.ndarray | None]:
    shape: tuple[int, int] = mask.shape
    h, w = shape
    size = min(h, w)
    yy, xx = _grid(shape)
    density = _vessel_density_lr(radius_px)

    # Field of view: a centred disc, grown to hold the vessels (up to a cap that keeps black corners).
    cy = h / 2 + _uniform(rng, p, "fov_shift_y", -0.02, 0.02) * size
    cx = w / 2 + _uniform(rng, p, "fov_shift_x", -0.02, 0.02) * size
    fov_r = _uniform(rng, p, "fov_radius_frac", 0.44, 0.54) * size
    fov_r = max(fov_r, min(_covering_radius(density, yy, xx, cy, cx), 0.62 * size))
    p["fov_radius_px"] = fov_r
    dist_c = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)

    # Optic disc where the vessel tree is widest and densest (vessels converge there), inside the FOV.
    smooth_density = cv2.GaussianBlur(density, (0, 0), 0.03 * size / _LOWRES_FACTOR)
    if density.any():
        disc_y, disc_x = _argmax_yx(smooth_density, yy, xx)
    else:
        disc_y = cy + _uniform(rng, p, "disc_fallback_dy", -0.3, 0.3) * fov_r
        disc_x = cx + _uniform(rng, p, "disc_fallback_dx", -0.5, 0.5) * fov_r
    off = math.hypot(disc_y - cy, disc_x - cx)
    if off > 0.8 * fov_r:
        disc_y, disc_x = cy + (disc_y - cy) * 0.8 * fov_r / off, cx + (disc_x - cx) * 0.8 * fov_r / off
    p["disc_center_px"] = [disc_y, disc_x]
    disc_r = _uniform(rng, p, "disc_radius_frac", 0.11, 0.19) * fov_r
    disc_aspect = _uniform(rng, p, "disc_aspect", 0.82, 1.0)
    disc_angle = _uniform(rng, p, "disc_angle", -0.3, 0.3)
    disc_soft = _uniform(rng, p, "disc_soft_frac", 0.2, 0.45) * disc_r
    disc = _ellipse_inside(yy, xx, disc_y, disc_x, disc_r, disc_r * disc_aspect, disc_angle, disc_soft)
    cup_r = _uniform(rng, p, "cup_ratio", 0.3, 0.6) * disc_r
    cup = _ellipse_inside(yy, xx, disc_y, disc_x, cup_r, cup_r * disc_aspect, disc_angle, 0.4 * disc_soft)

    # Macula: ~2.5 disc diameters from the disc, across the centre, where the vessels leave most room.
    if off > 0.12 * fov_r:
        toward = math.atan2(cy - disc_y, cx - disc_x)
    else:
        toward = _uniform(rng, p, "macula_direction", -math.pi, math.pi)
    mac_dist = _uniform(rng, p, "macula_dist_dd", 2.2, 2.8) * 2 * disc_r
    best: tuple[float, float, float] | None = None
    for a in np.linspace(toward - 0.5, toward + 0.5, 7):
        my, mx = disc_y + mac_dist * math.sin(a), disc_x + mac_dist * math.cos(a)
        iy = min(max(int(my / h * yy.shape[0]), 0), yy.shape[0] - 1)
        ix = min(max(int(mx / w * yy.shape[1]), 0), yy.shape[1] - 1)
        score = float(smooth_density[iy, ix]) + 1e-3 * abs(float(a) - toward)
        if best is None or score < best[0]:
            best = (score, my, mx)
    assert best is not None
    mac_y, mac_x = best[1], best[2]
    p["macula_center_px"] = [mac_y, mac_x]
    mac_sigma = _uniform(rng, p, "macula_sigma_dd", 0.5, 0.8) * 2 * disc_r
    mac_depth = _uniform(rng, p, "macula_depth", 0.2, 0.45)
    macula = np.exp(-((yy - mac_y) ** 2 + (xx - mac_x) ** 2) / (2 * mac_sigma**2))

    # Illumination: vignetting towards the FOV rim, a lateral gradient and smooth blotches.
    vig_amount = _uniform(rng, p, "vignette_amount", 0.25, 0.6)
    vig_power = _uniform(rng, p, "vignette_power", 2.0, 4.0)
    grad_amount = _uniform(rng, p, "illum_gradient", 0.0, 0.25)
    grad_angle = _uniform(rng, p, "illum_gradient_angle", -math.pi, math.pi)
    blotch = _uniform(rng, p, "illum_blotch", 0.03, 0.09)
    illum = 1.0 - vig_amount * np.minimum(dist_c / fov_r, 1.2) ** vig_power
    illum += grad_amount * ((xx - cx) * math.cos(grad_angle) + (yy - cy) * math.sin(grad_angle)) / fov_r
    illum += blotch * _smooth_lowres(rng, p, "illum_blotch_cells", yy.shape, 5)
    illum = np.maximum(illum, 0.05)

    # Colours (B, G, R in 0..1): orange-red retina, yellow-white disc, whiter cup, darker macula.
    red = _uniform(rng, p, "retina_red", 0.6, 0.9)
    green = red * _uniform(rng, p, "retina_green_ratio", 0.28, 0.45)
    blue = red * _uniform(rng, p, "retina_blue_ratio", 0.05, 0.18)
    retina = np.array([blue, green, red], np.float32)
    disc_col = np.array(
        [
            _uniform(rng, p, "disc_blue", 0.04, 0.2),
            _uniform(rng, p, "disc_green", 0.55, 0.85),
            _uniform(rng, p, "disc_red", 0.95, 1.0),
        ],
        np.float32,
    )
    cup_gain = _uniform(rng, p, "cup_brightness", 0.03, 0.15)
    mac_tint = np.array([0.8, 1.0, 0.9], np.float32)  # macular pigment takes more green and red than blue
    col = retina * (1.0 - mac_depth * mac_tint * macula[..., None])
    cup_tint = np.array([0.3, 1.0, 1.0], np.float32)  # the cup is paler, but still yellow-white
    disc_full = np.minimum(disc_col + cup_gain * cup_tint * cup[..., None], 1.0)
    col = col * (1.0 - disc[..., None]) + disc_full * disc[..., None]
    col *= illum[..., None]
    log_col = np.log(np.maximum(col, 1e-3)).astype(np.float32)

    # Per pixel and channel, in log intensity: vessel absorption (blood absorbs green and blue far more
    # than red, so vessels look dark red), retina texture and sensor noise from a planar B, G, R tile.
    # Channel by channel in single-channel arrays, merged as uint8: fewer memory passes than 3-channel
    # float work, which is what the time goes on at this size.
    chord = _optics_blur(_chord_px(mask, radius_px), _uniform(rng, p, "vessel_blur_px", 0.55, 1.0))
    mu_green = _uniform(rng, p, "mu_green_per_px", 0.07, 0.14)
    mu_bgr = [
        mu_green * _uniform(rng, p, "mu_blue_ratio", 0.55, 0.9),
        mu_green,
        mu_green * _uniform(rng, p, "mu_red_ratio", 0.25, 0.5),
    ]
    grain_gain = _uniform(rng, p, "grain_gain", 0.3, 1.0)
    grain_bgr = _crop("fundus_grain", shape, rng, p)
    channels = []
    for c in range(3):
        log_c = cv2.resize(np.ascontiguousarray(log_col[:, :, c]), (w, h), interpolation=cv2.INTER_LINEAR)
        cv2.scaleAdd(grain_bgr[c], grain_gain, log_c, dst=log_c)
        cv2.scaleAdd(chord, -mu_bgr[c], log_c, dst=log_c)
        cv2.exp(log_c, dst=log_c)
        channels.append(cv2.convertScaleAbs(log_c, alpha=255.0))  # exp() > 0: the abs() is a no-op
    fov = _fov_disc(shape, cy, cx, fov_r)
    image = cv2.copyTo(cv2.merge(channels), fov, np.zeros((h, w, 3), np.uint8))  # black outside the FOV
    return image, fov


def _render_xca(
    mask: np.ndarray, radius_px: np.ndarray, rng: np.random.Generator, p: Params
) -> tuple[np.ndarray, np.ndarray | None]:
    shape: tuple[int, int] = mask.shape
    h, w = shape
    size = min(h, w)
    yy, xx = _grid(shape)
    lr_shape: tuple[int, int] = yy.shape

    # Attenuation of the patient (natural-log units): heart shadow, diaphragm, spine, ribs, soft blotches.
    att = _uniform(rng, p, "heart_depth", 0.15, 0.45) * _ellipse_inside(
        yy,
        xx,
        _uniform(rng, p, "heart_cy_frac", 0.45, 0.85) * h,
        _uniform(rng, p, "heart_cx_frac", 0.3, 0.7) * w,
        _uniform(rng, p, "heart_ry_frac", 0.25, 0.45) * size,
        _uniform(rng, p, "heart_rx_frac", 0.3, 0.55) * size,
        _uniform(rng, p, "heart_angle", 0.0, math.pi),
        _uniform(rng, p, "heart_soft_frac", 0.08, 0.2) * size,
    )
    if _chance(rng, p, "has_diaphragm", 0.7):
        y0 = _uniform(rng, p, "diaphragm_y_frac", 0.55, 0.95) * h
        x0 = _uniform(rng, p, "diaphragm_x_frac", 0.0, 1.0) * w
        curvature = _uniform(rng, p, "diaphragm_curvature", 0.3, 1.2)
        soft = _uniform(rng, p, "diaphragm_soft_frac", 0.02, 0.06) * size
        edge_y = y0 - curvature * (xx - x0) ** 2 / size
        att += _uniform(rng, p, "diaphragm_depth", 0.2, 0.5) * _smoothstep((yy - edge_y) / soft + 0.5)
    if _chance(rng, p, "has_spine", 0.6):
        tilt = _uniform(rng, p, "spine_tilt", -0.15, 0.15)
        spine_x = _uniform(rng, p, "spine_x_frac", 0.2, 0.8) * w + tilt * (yy - h / 2)
        half = _uniform(rng, p, "spine_half_width_frac", 0.06, 0.1) * size
        period = _uniform(rng, p, "vertebra_period_frac", 0.1, 0.16) * size
        band = _smoothstep((half - np.abs(xx - spine_x)) / (0.3 * half) + 0.5)
        vertebrae = 1.0 + 0.3 * np.cos(2 * math.pi * yy / period)
        att += _uniform(rng, p, "spine_depth", 0.08, 0.2) * band * vertebrae
    rib_period = _uniform(rng, p, "rib_period_frac", 0.14, 0.22) * size
    rib_curvature = _uniform(rng, p, "rib_curvature", -0.8, 0.8)
    rib_angle = _uniform(rng, p, "rib_angle", -0.4, 0.4)
    rib_phase = _uniform(rng, p, "rib_phase", 0.0, 1.0)
    along = (yy - h / 2) * math.cos(rib_angle) + (xx - w / 2) * math.sin(rib_angle)
    across = (xx - w / 2) * math.cos(rib_angle) - (yy - h / 2) * math.sin(rib_angle)
    wave = np.cos(2 * math.pi * ((along + rib_curvature * across * across / size) / rib_period + rib_phase))
    att += _uniform(rng, p, "rib_depth", 0.03, 0.09) * _smoothstep((wave - 0.2) / 0.35)
    att += _uniform(rng, p, "blotch", 0.03, 0.08) * _smooth_lowres(rng, p, "blotch_cells", lr_shape, 5)
    vignette = _uniform(rng, p, "vignette", 0.1, 0.35)
    att += vignette * ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (0.5 * size) ** 2
    exposure = _uniform(rng, p, "exposure", 0.45, 0.75)
    log_bg = _upsample((math.log(exposure) - att).astype(np.float32), shape)

    # Vessels: iodine absorption along the chord, unevenly filled (contrast washes out distally).
    chord = _chord_px(mask, radius_px)
    if _chance(rng, p, "has_catheter", 0.65):
        if float(radius_px.max()) > 0:
            _draw_catheter(chord, radius_px, rng, p)
        else:
            p["has_catheter"] = False  # no vessel to lead into
    chord = _optics_blur(chord, _uniform(rng, p, "vessel_blur_px", 0.6, 1.2))
    mu = _uniform(rng, p, "mu_per_px", 0.045, 0.09)
    filling = 1.0 + _uniform(rng, p, "filling_variation", 0.1, 0.35) * _smooth_lowres(
        rng, p, "filling_cells", lr_shape, 3
    )
    cv2.multiply(chord, _upsample((mu * np.maximum(filling, 0.3)).astype(np.float32), shape), dst=chord)
    intensity = cv2.subtract(log_bg, chord)
    cv2.exp(intensity, dst=intensity)

    # Quantum noise: photon counts are Poisson, so sigma grows as sqrt(intensity).
    quanta = _uniform(rng, p, "quanta_per_px", 300.0, 2500.0)
    noise = cv2.multiply(cv2.sqrt(intensity), _crop("grain", shape, rng, p))
    cv2.scaleAdd(noise, 1.0 / math.sqrt(quanta), intensity, dst=intensity)
    return _to_uint8(intensity), None


def _render_dsa(
    mask: np.ndarray, radius_px: np.ndarray, rng: np.random.Generator, p: Params
) -> tuple[np.ndarray, np.ndarray | None]:
    shape: tuple[int, int] = mask.shape
    h, w = shape
    size = min(h, w)
    yy, xx = _grid(shape)
    lr_shape: tuple[int, int] = yy.shape
    density = _vessel_density_lr(radius_px)

    # Subtracted background: nearly flat light grey, a little uneven.
    level = _uniform(rng, p, "background_level", 0.62, 0.85)
    log_bg = math.log(level) + _uniform(rng, p, "background_unevenness", 0.01, 0.05) * _smooth_lowres(
        rng, p, "background_cells", lr_shape, 4
    )
    log_bg -= (
        _uniform(rng, p, "vignette", 0.0, 0.12) * ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (0.5 * size) ** 2
    )
    log_bg_up = _upsample(log_bg.astype(np.float32), shape)

    chord = _chord_px(mask, radius_px)
    mu = _uniform(rng, p, "mu_per_px", 0.1, 0.2)

    # Residual bone edges from patient motion between mask and fill frames: pairs of thin bright/dark
    # contours (skull outline, inner bone ridges), drawn into the chord layer in attenuation units.
    motion = _uniform(rng, p, "motion_px", 0.8, 3.0)
    motion_angle = _uniform(rng, p, "motion_angle", -math.pi, math.pi)
    shift = (motion * math.cos(motion_angle), motion * math.sin(motion_angle))
    residual = _uniform(rng, p, "residual_edge", 0.02, 0.09) / mu
    num_arcs = int(rng.integers(1, 4))
    p["num_inner_arcs"] = num_arcs
    arcs = [
        (
            h / 2 + _uniform(rng, p, "skull_dy_frac", -0.08, 0.08) * size,
            w / 2 + _uniform(rng, p, "skull_dx_frac", -0.08, 0.08) * size,
            _uniform(rng, p, "skull_ry_frac", 0.38, 0.6) * size,
            _uniform(rng, p, "skull_rx_frac", 0.33, 0.5) * size,
            _uniform(rng, p, "skull_angle_deg", -20.0, 20.0),
            0.0,
            360.0,
        )
    ]
    for k in range(num_arcs):
        start = _uniform(rng, p, f"arc{k}_start_deg", 0.0, 360.0)
        arcs.append(
            (
                _uniform(rng, p, f"arc{k}_cy_frac", 0.2, 0.8) * h,
                _uniform(rng, p, f"arc{k}_cx_frac", 0.2, 0.8) * w,
                _uniform(rng, p, f"arc{k}_ry_frac", 0.05, 0.3) * size,
                _uniform(rng, p, f"arc{k}_rx_frac", 0.05, 0.3) * size,
                _uniform(rng, p, f"arc{k}_angle_deg", 0.0, 180.0),
                start,
                start + _uniform(rng, p, f"arc{k}_span_deg", 60.0, 200.0),
            )
        )
    thickness = int(rng.integers(1, 3))
    p["residual_thickness_px"] = thickness
    for sign, (sy, sx) in ((1.0, (0.0, 0.0)), (-1.0, shift)):
        for cy_, cx_, ry, rx, angle, a0, a1 in arcs:
            cv2.ellipse(
                chord,
                (round(cx_ + sx), round(cy_ + sy)),
                (round(rx), round(ry)),
                angle,
                a0,
                a1,
                sign * residual,
                thickness,
            )
    chord = _optics_blur(chord, _uniform(rng, p, "vessel_blur_px", 0.6, 1.1))

    filling = 1.0 + _uniform(rng, p, "filling_variation", 0.05, 0.3) * _smooth_lowres(
        rng, p, "filling_cells", lr_shape, 3
    )
    cv2.multiply(chord, _upsample((mu * np.maximum(filling, 0.3)).astype(np.float32), shape), dst=chord)
    intensity = cv2.subtract(log_bg_up, chord)
    cv2.exp(intensity, dst=intensity)
    cv2.scaleAdd(
        _crop("normal_a", shape, rng, p),
        _uniform(rng, p, "noise_sigma", 0.006, 0.022),
        intensity,
        dst=intensity,
    )
    image = _to_uint8(intensity)

    # Collimator: a round image-intensifier field or a rectangular shutter, grown to hold the vessels.
    fov = np.zeros(shape, np.uint8)
    if _chance(rng, p, "round_fov", 0.5):
        cy, cx = h / 2, w / 2
        radius = _uniform(rng, p, "fov_radius_frac", 0.47, 0.62) * size
        radius = max(radius, min(_covering_radius(density, yy, xx, cy, cx), 0.7 * size))
        p["fov_radius_px"] = radius
        cv2.circle(fov, (round(cx), round(cy)), round(radius), 255, thickness=-1)
    else:
        margins = [
            _uniform(rng, p, f"shutter_{side}_frac", 0.0, 0.07) for side in ("top", "bottom", "left", "right")
        ]
        top, bottom, left, right = (round(m * size) for m in margins)
        rows = np.flatnonzero(density.any(axis=1))
        cols = np.flatnonzero(density.any(axis=0))
        if rows.size:  # shrink the margins to keep every vessel cell inside the shutter
            cell_h, cell_w = h / density.shape[0], w / density.shape[1]
            top = min(top, int(rows[0] * cell_h))
            bottom = min(bottom, int(h - (rows[-1] + 1) * cell_h))
            left = min(left, int(cols[0] * cell_w))
            right = min(right, int(w - (cols[-1] + 1) * cell_w))
        top, bottom, left, right = (max(0, m) for m in (top, bottom, left, right))
        p["shutter_px"] = [top, bottom, left, right]
        fov[top : h - bottom, left : w - right] = 255
    cv2.bitwise_and(image, fov, dst=image)
    return image, fov


def _render_octa(
    mask: np.ndarray, radius_px: np.ndarray, rng: np.random.Generator, p: Params
) -> tuple[np.ndarray, np.ndarray | None]:
    shape: tuple[int, int] = mask.shape
    h, w = shape
    size = min(h, w)
    # A grid twice as fine as elsewhere: the foveal zone is small and its rim must look round.
    factor = _LOWRES_FACTOR // 2
    yy, xx = _grid(shape, factor)
    lr_shape: tuple[int, int] = yy.shape
    density = cv2.GaussianBlur(_vessel_density_lr(radius_px, factor), (0, 0), 0.03 * size / factor)

    # Foveal avascular zone: near the centre, where the large vessels leave the most room; irregular rim.
    reach = _uniform(rng, p, "faz_search_frac", 0.05, 0.15) * size
    near = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= reach**2
    candidates = np.where(near, density, np.inf)
    faz_y, faz_x = _argmax_yx(-candidates, yy, xx)
    p["faz_center_px"] = [faz_y, faz_x]
    faz_r = _uniform(rng, p, "faz_radius_frac", 0.045, 0.1) * size
    theta = np.arctan2(yy - faz_y, xx - faz_x)
    wobble = np.ones(lr_shape, np.float32)
    for k in (2, 3, 5):
        amp = _uniform(rng, p, f"faz_wobble{k}", 0.0, 0.08)
        wobble += amp * np.cos(k * theta + _uniform(rng, p, f"faz_phase{k}", 0.0, 2 * math.pi))
    rho = np.sqrt((yy - faz_y) ** 2 + (xx - faz_x) ** 2) / (faz_r * wobble)
    capillaries_here = _smoothstep((rho - 1.0) / 0.35)

    # Background: dark, with a smooth gain field and sometimes a shadow (vitreous floater).
    gain = 1.0 + _uniform(rng, p, "gain_variation", 0.08, 0.3) * _smooth_lowres(
        rng, p, "gain_cells", lr_shape, 4
    )
    if _chance(rng, p, "has_shadow", 0.3):
        gain *= 1.0 - _uniform(rng, p, "shadow_depth", 0.3, 0.7) * _ellipse_inside(
            yy,
            xx,
            _uniform(rng, p, "shadow_cy_frac", 0.0, 1.0) * h,
            _uniform(rng, p, "shadow_cx_frac", 0.0, 1.0) * w,
            _uniform(rng, p, "shadow_ry_frac", 0.05, 0.2) * size,
            _uniform(rng, p, "shadow_rx_frac", 0.05, 0.2) * size,
            0.0,
            0.06 * size,
        )
    gain = np.maximum(gain, 0.1)
    level = _uniform(rng, p, "background_level", 0.05, 0.14)
    faz_level = _uniform(rng, p, "faz_level", 0.5, 1.0)  # FAZ floor relative to the background
    capillary_gain = _uniform(rng, p, "capillary_gain", 1.1, 1.9)
    vessel_gain = _uniform(rng, p, "vessel_gain", 0.45, 0.75)
    # Vessel term A * (1 - exp(-mu L)) = A - A exp(-mu L): the constant A goes into the background field.
    base = level * gain * (faz_level + (1.0 - faz_level) * capillaries_here) + vessel_gain
    base_up = _upsample(base.astype(np.float32), shape)
    cap_up = _upsample((capillary_gain * gain * capillaries_here).astype(np.float32), shape)

    chord = _optics_blur(_chord_px(mask, radius_px), _uniform(rng, p, "vessel_blur_px", 0.5, 0.9))
    mu = _uniform(rng, p, "mu_per_px", 0.25, 0.5)
    transmitted = cv2.exp(np.multiply(chord, np.float32(-mu)))
    intensity = cv2.multiply(cap_up, _crop("capillary", shape, rng, p))
    cv2.add(intensity, base_up, dst=intensity)
    cv2.scaleAdd(transmitted, -vessel_gain, intensity, dst=intensity)

    # Speckle: multiplicative, on vessels and background alike (flow signal decorrelates everywhere).
    strength = _uniform(rng, p, "speckle_strength", 0.2, 0.45)
    speckle = cv2.addWeighted(
        _crop("speckle", shape, rng, p), strength, base_up, 0.0, 1.0 - strength
    )  # speckle * strength + (1 - strength), in one pass
    cv2.multiply(intensity, speckle, dst=intensity)
    return _to_uint8(intensity), None


def _render_mra(
    mask: np.ndarray, radius_px: np.ndarray, rng: np.random.Generator, p: Params
) -> tuple[np.ndarray, np.ndarray | None]:
    shape: tuple[int, int] = mask.shape
    h, w = shape
    size = min(h, w)
    yy, xx = _grid(shape)
    lr_shape: tuple[int, int] = yy.shape

    # Head haze: the MIP of stationary tissue, an ellipse with a brighter scalp rim, on an air background.
    head_y = h / 2 + _uniform(rng, p, "head_dy_frac", -0.05, 0.05) * size
    head_x = w / 2 + _uniform(rng, p, "head_dx_frac", -0.05, 0.05) * size
    head_rx = _uniform(rng, p, "head_rx_frac", 0.36, 0.48) * size
    head_ry = head_rx * _uniform(rng, p, "head_aspect", 1.0, 1.3)
    head_angle = _uniform(rng, p, "head_angle", -0.2, 0.2)
    soft = _uniform(rng, p, "head_soft_frac", 0.01, 0.04) * size
    rim_width = _uniform(rng, p, "rim_width_frac", 0.02, 0.05) * size
    inside = _ellipse_inside(yy, xx, head_y, head_x, head_ry, head_rx, head_angle, soft)
    inner = _ellipse_inside(
        yy, xx, head_y, head_x, head_ry - rim_width, head_rx - rim_width, head_angle, 2 * soft
    )
    haze = _uniform(rng, p, "tissue_level", 0.06, 0.16) * inside + _uniform(
        rng, p, "rim_level", 0.0, 0.12
    ) * (inside - inner)
    haze *= 1.0 + _uniform(rng, p, "haze_unevenness", 0.05, 0.25) * _smooth_lowres(
        rng, p, "haze_cells", lr_shape, 4
    )
    haze = np.maximum(haze, 0.0) + _uniform(rng, p, "air_level", 0.005, 0.03)
    haze_up = _upsample(haze.astype(np.float32), shape)
    signal = cv2.multiply(haze_up, _crop("mottle", shape, rng, p), scale=_uniform(rng, p, "mottle", 0.1, 0.3))
    cv2.add(signal, haze_up, dst=signal)

    # Vessels: inflow signal A * (1 - exp(-mu L)), saturating for the large arteries; slow flow (smooth
    # field) lowers it, so distal branches fade as in time-of-flight images.
    chord = _optics_blur(_chord_px(mask, radius_px), _uniform(rng, p, "vessel_blur_px", 0.7, 1.3))
    vessel_gain = _uniform(rng, p, "vessel_gain", 0.5, 0.9)
    mu = _uniform(rng, p, "mu_per_px", 0.15, 0.45)
    flow = 1.0 + _uniform(rng, p, "flow_variation", 0.1, 0.4) * _smooth_lowres(
        rng, p, "flow_cells", lr_shape, 3
    )
    cv2.multiply(chord, _upsample((-mu * np.maximum(flow, 0.2)).astype(np.float32), shape), dst=chord)
    transmitted = cv2.exp(chord)
    np.add(signal, np.float32(vessel_gain), out=signal)
    cv2.scaleAdd(transmitted, -vessel_gain, signal, dst=signal)

    # Rician noise: the magnitude of a complex signal with Gaussian noise on both parts.
    sigma = _uniform(rng, p, "noise_sigma", 0.012, 0.04)
    real = cv2.scaleAdd(_crop("normal_a", shape, rng, p), sigma, signal)
    imag = _crop("normal_b", shape, rng, p)
    magnitude = cv2.multiply(real, real)
    cv2.add(magnitude, cv2.multiply(imag, imag, scale=sigma * sigma), dst=magnitude)
    cv2.sqrt(magnitude, dst=magnitude)
    return _to_uint8(magnitude), None


_RENDERERS: dict[
    str, Callable[[np.ndarray, np.ndarray, np.random.Generator, Params], tuple[np.ndarray, np.ndarray | None]]
] = {
    "fundus": _render_fundus,
    "xca": _render_xca,
    "dsa": _render_dsa,
    "octa": _render_octa,
    "mra": _render_mra,
}
assert tuple(_RENDERERS) == MODALITIES, "every built-in modality needs a renderer"

# Modalities whose images have a field of view outside which the image is black.
MODALITIES_WITH_FOV: tuple[str, ...] = ("fundus", "dsa")


def render(
    modality: str, mask: np.ndarray, radius_px: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Render one image of `modality` for a vessel mask and its radii.

    Returns (image, fov, params): image uint8 HxWx3 BGR for fundus, HxW for the grey modalities; fov uint8
    HxW {0, 255} for the modalities in MODALITIES_WITH_FOV, else None; params holds every value drawn from
    `rng` (JSON-serialisable). `mask` non-zero = vessel; `radius_px` float, >= 0, vessel radius in px.
    """
    renderer = _RENDERERS.get(modality)
    if renderer is None:
        raise ValueError(f"render: unknown modality {modality!r}; built in: {', '.join(MODALITIES)}")
    if not isinstance(mask, np.ndarray) or mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(
            f"render: mask must be an HxW uint8 array, got {getattr(mask, 'dtype', type(mask))} "
            f"{getattr(mask, 'shape', '')}"
        )
    if mask.shape[0] < 8 or mask.shape[1] < 8:
        raise ValueError(f"render: mask is {mask.shape}, need at least 8x8 px")
    if not isinstance(radius_px, np.ndarray) or radius_px.shape != mask.shape or radius_px.dtype.kind != "f":
        raise ValueError(
            f"render: radius_px must be a float array of the mask's shape {mask.shape}, got "
            f"{getattr(radius_px, 'dtype', type(radius_px))} {getattr(radius_px, 'shape', '')}"
        )
    radius_px = np.ascontiguousarray(radius_px, dtype=np.float32)
    _keep_freed_memory()
    params: Params = {"modality": modality}
    image, fov = renderer(np.ascontiguousarray(mask), radius_px, rng, params)
    return image, fov, params

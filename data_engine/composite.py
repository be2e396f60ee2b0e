"""Real-background compositing: new vessel masks drawn into the backgrounds of a task's few real images.

    background = remove_vessels(image, mask, fov)              # the real image with its vessels erased
    profile = measure_profile(image, mask, fov, background)    # how vessels look in this modality
    # (or both at once, the mask decomposed once: background, profile = remove_and_measure(image, mask, fov))
    profile = merge_profiles([profile_1, ..., profile_5])      # one profile from all the shots
    new_mask, new_radius_px = clip_to_fov(*render_mask(graph, shape), fov)
    image2 = draw_vessels(background, new_mask, new_radius_px, profile, rng, fov)

Images are uint8 HxW (grey) or HxWx3 (BGR, as io.read_image returns them); masks and fov uint8 HxW,
vessel / inside > 0 (normally {0,255}); radius maps float32 HxW px, as graph.render_mask returns them.

Geometry. Every pixel near a vessel gets a local vessel radius r (px, the graph convention: a 1-px wide
vessel has r = 0.5) and a normalised distance t from the centreline: t = 0 on the centreline, 1 at the
vessel's edge, beyond 1 outside it. Inside the mask t comes from the distance to the nearest non-vessel
pixel (so junctions and overlaps stay dark/bright, where a nearest-centreline rule would leave notches);
outside it from the distance to the nearest vessel pixel, in units of r clipped to [1, 10] px: thin
vessels keep a few pixels of blur, and past a wide vessel's edge (a lumen cut across, whose wall is a
few px thick whatever its radius) the grid stays in steps of 1.25 px rather than r / 8. Contrast is
measured and drawn on the same (r, t) grid, with the same rules.

Contrast models, both measured, the one that predicts the real vessel pixels better is used:
  "log": I = (B + 1) * exp(c) - 1, c = log((I + 1) / (B + 1)): absorbing vessels (fundus, X-ray), whose
         contrast scales with the local illumination B;
  "add": I = B + c: vessels that emit light over a near-black background (OCT angiography).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Literal, cast

import cv2
import numpy as np

from data_engine.graph import decompose, render_mask

# Normalised distance grid: 0 (centreline) .. _T_MAX (2 vessel radii beyond the edge, at least 2 px and
# at most 20 px, where the blur of every real set we measured has died out), in bins of _T_STEP.
_T_MAX = 3.0
_T_STEP = 0.125
# Outside a vessel, t counts px in units of the radius up to this many px (see the module doc).
_OUT_UNIT_MAX_PX = 10.0
# Radius bins (px). Graph radii come in 0.5 px steps for thin vessels (1, 2, 3 px wide), hence the edges
# between them; wider bins for the few thick vessels.
_RADIUS_EDGES_PX = (0.0, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 10.0, np.inf)
# remove_vessels re-fills the vessels plus a margin (px) measured per image (see _hole), between these
# bounds, plus _HOLE_MARGIN_PER_RADIUS * the radius: labels of wide vessels are off by more than those
# of thin ones. A fixed 2 px margin left dark ghost lines along CIMAT_XCA80's vessels.
_MIN_MARGIN_PX = 2.0
_MAX_MARGIN_PX = 8.0
_TAIL_FRACTION = 0.1
_HOLE_MARGIN_PER_RADIUS = 0.3
# Push-pull fill: a coarse pixel whose footprint is at least 1/_ALPHA_GAIN known pixels is trusted.
_ALPHA_GAIN = 2.0
# Grain transplant shifts tried per hole pixel (in units of the shift length), in this order.
_SHIFT_DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, -1))
_NUM_SHIFTS = 3
# Borrowed grain beyond this many robust standard deviations is structure, not grain (see _remove).
_GRAIN_CLIP = 2.5
# Per-sample contrast jitter: a global factor uniform in 1 +- _JITTER, times a smooth field 1 +- ~_FIELD.
_JITTER = 0.15
_FIELD = 0.08
# Cells of the smooth jitter field along the longer image side.
_FIELD_CELLS = 6
# Vessel grain is measured as the residual of a Gaussian blur of this sigma (px): finer than any
# vessel's profile, coarse enough to hold most of the speckle and quantum noise.
_GRAIN_SIGMA_PX = 1.0
# measure_profile sorts at most this many pixels per channel (a fixed random subsample beyond).
_MAX_MEASURED = 250_000
# MAD -> standard deviation for Gaussian data.
_MAD_TO_STD = 1.4826

Model = Literal["log", "add"]


# --- the profile --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VesselProfile:
    """How vessels look in one modality: contrast to the background per (radius bin, distance bin, channel).

    Legend: R radius bins, T normalised-distance bins (width t_step from 0), C channels (1 grey, 3 BGR).
    """

    radius_edges_px: np.ndarray  # float64 (R + 1,) px, bin edges of the local vessel radius
    radius_centre_px: np.ndarray  # float64 (R,) px, median measured radius per bin (bin middle if empty)
    t_step: float  # width of a normalised-distance bin (t = 0 centreline, 1 vessel edge)
    contrast_log_RTC: np.ndarray  # float32, median log((I + 1) / (B + 1)); empty cells interpolated
    contrast_add_RTC: np.ndarray  # float32 grey levels, median I - B; empty cells interpolated
    count_RT: np.ndarray  # int64 pixels measured per cell (0: interpolated)
    model: str  # "log" or "add": the contrast model draw_vessels applies
    error_log: float  # grey levels, mean |I - prediction| over vessel pixels, log model
    error_add: float  # grey levels, the same for the additive model
    polarity: int  # -1 vessels darker than the background, +1 brighter
    edge_blur_px: float  # px, Gaussian sigma of the vessel edge (from the profile's 80 % -> 20 % fall)
    noise_std_C: np.ndarray  # float64 (C,) grey levels, texture inside vessels beyond the background's

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value.flags.writeable = False
        num_r, num_t, _ = self.contrast_log_RTC.shape
        assert self.contrast_add_RTC.shape == self.contrast_log_RTC.shape, "contrast tables disagree"
        assert self.count_RT.shape == (num_r, num_t) and len(self.radius_edges_px) == num_r + 1
        assert self.model in ("log", "add") and self.polarity in (-1, 1)

    @property
    def num_channels(self) -> int:
        return int(self.contrast_log_RTC.shape[2])

    @property
    def contrast_RTC(self) -> np.ndarray:
        """The table of the chosen model."""
        return self.contrast_log_RTC if self.model == "log" else self.contrast_add_RTC

    def to_json(self) -> str:
        """JSON text (arrays as nested lists), for a run folder; `from_json` reads it back."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            out[f.name] = value
        # JSON has no infinity: the open last radius edge is written as null.
        out["radius_edges_px"] = [v if np.isfinite(v) else None for v in out["radius_edges_px"]]
        return json.dumps(out)

    @classmethod
    def from_json(cls, text: str) -> VesselProfile:
        """A profile from `to_json` text; raises ValueError on missing or malformed fields."""
        try:
            data = json.loads(text)
            edges = np.array([np.inf if v is None else v for v in data["radius_edges_px"]], np.float64)
            return cls(
                radius_edges_px=edges,
                radius_centre_px=np.asarray(data["radius_centre_px"], np.float64),
                t_step=float(data["t_step"]),
                contrast_log_RTC=np.asarray(data["contrast_log_RTC"], np.float32),
                contrast_add_RTC=np.asarray(data["contrast_add_RTC"], np.float32),
                count_RT=np.asarray(data["count_RT"], np.int64),
                model=str(data["model"]),
                error_log=float(data["error_log"]),
                error_add=float(data["error_add"]),
                polarity=int(data["polarity"]),
                edge_blur_px=float(data["edge_blur_px"]),
                noise_std_C=np.asarray(data["noise_std_C"], np.float64),
            )
        except (KeyError, TypeError, ValueError, AssertionError, json.JSONDecodeError) as e:
            raise ValueError(f"not a VesselProfile JSON ({type(e).__name__}: {e})") from e


# --- input checks -------------------------------------------------------------------------------------


def _check_image(image: np.ndarray, name: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        got = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name} must be a uint8 array (HxW grey or HxWx3 BGR), got {got}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)) or min(image.shape[:2]) < 4:
        raise ValueError(f"{name} must be HxW or HxWx3 with H, W >= 4, got shape {image.shape}")


def _check_map(a: np.ndarray | None, name: str, shape: tuple[int, ...], dtype: Any) -> None:
    if a is None:
        return
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.shape != shape:
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(
            f"{name} must be {np.dtype(dtype).name} of shape {shape} (the image's HxW), got {got}"
        )


def _check_inputs(
    image: np.ndarray, mask: np.ndarray, fov: np.ndarray | None, image_name: str = "image"
) -> tuple[np.ndarray, np.ndarray]:
    """(mask as bool, fov as bool: all True when None), after checking dtypes, shapes, emptiness."""
    _check_image(image, image_name)
    hw = image.shape[:2]
    _check_map(mask, "mask", hw, np.uint8)
    _check_map(fov, "fov", hw, np.uint8)
    inside = np.ones(hw, bool) if fov is None else fov > 0
    if not inside.any():
        raise ValueError("fov is empty (no pixel > 0): it must mark the image's field of view")
    vessel = mask > 0
    if not (vessel & inside).any():
        raise ValueError("mask is empty inside the fov (no vessel pixel > 0): nothing to measure or draw")
    return vessel, inside


def _as_hwc(image: np.ndarray) -> np.ndarray:
    return image.reshape(*image.shape[:2], -1)


# --- geometry -----------------------------------------------------------------------------------------


def _nearest_labels(zero_at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance px, index into np.nonzero(zero_at)) of the nearest True pixel of zero_at, per pixel."""
    # DIST_LABEL_PIXEL numbers the zero pixels from 1 in raster order, the order np.nonzero lists them.
    dist, label = cv2.distanceTransformWithLabels(
        (~zero_at).astype(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
    )
    return dist, label.astype(np.int64) - 1


def _geometry(vessel: np.ndarray, radius_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(t, r) per pixel: normalised distance from the centreline and local vessel radius (module doc)."""
    d_in = cv2.distanceTransform(vessel.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    d_out, nearest = _nearest_labels(vessel)
    r = radius_px[vessel][nearest].astype(np.float32)
    r[vessel] = radius_px[vessel]
    # Pixel centres lie 0.5 px inside (outside) the continuous edge at distance 1 from the nearest pixel
    # across it, hence the - 0.5.
    t_in = np.clip(1.0 - (d_in - 0.5) / np.maximum(r, 0.5), 0.0, 1.0)
    t_out = 1.0 + (d_out - 0.5) / np.clip(r, 1.0, _OUT_UNIT_MAX_PX)
    return np.where(vessel, t_in, t_out).astype(np.float32), r


def _graph_radius(vessel: np.ndarray) -> np.ndarray:
    """Radius (px) at each vessel pixel, as graph.render_mask would give it for this mask's graph.

    Measured through decompose/render_mask so that the radii the profile is binned by are the radii
    draw_vessels will be handed for recombined masks. Pixels the rendered graph misses take the radius
    of the nearest rendered pixel.
    """
    rendered, radius_px = render_mask(decompose(vessel.astype(np.uint8) * np.uint8(255)), vessel.shape)
    drawn = rendered > 0
    if not drawn.any():  # a mask of specks decompose drops: treat them as 1-px vessels
        return np.where(vessel, np.float32(0.5), np.float32(0.0))
    _, nearest = _nearest_labels(drawn)
    out = radius_px[drawn][nearest]
    return np.where(vessel, np.maximum(out, 0.5), 0.0).astype(np.float32)


def _hole_radius(vessel: np.ndarray, graph_radius: np.ndarray) -> np.ndarray:
    """Radius (px) at each vessel pixel for the hole margin and the grain shift: the graph's radius
    (_graph_radius), or the largest inside distance within a few px where that is more (a pixel the graph
    misses)."""
    d_in = cv2.distanceTransform(vessel.astype(np.uint8), cv2.DIST_L2, 3)
    # The largest inside distance within 3 px is the radius on the centreline nearby, for thin vessels;
    # at the rim of a lumen 50 px across it reads ~4 px, hence the graph's radius beside it.
    local_max = cv2.dilate(d_in, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    rough = np.where(vessel, np.maximum(local_max - 0.5, 0.5), 0.0).astype(np.float32)
    return np.maximum(rough, graph_radius)


# --- vessel removal -----------------------------------------------------------------------------------


def _coarse_fill(image_HWC: np.ndarray, valid_HW: np.ndarray) -> np.ndarray:
    """A smooth estimate of every pixel from the valid ones only (pyramid normalised convolution,
    "push-pull"): where valid_HW == 0, the value to fill the hole with.

    A hole pixel is filled from the coarsest level at which its surroundings are known, so the fill
    follows the background's illumination without streaks. Only the pixels outside valid_HW are meant
    to be used (valid ones come back blurred).
    """
    h, w, c = image_HWC.shape
    values = [cv2.multiply(image_HWC, np.repeat(valid_HW[:, :, None], c, 2)).reshape(h, w, c)]
    weights = [valid_HW]
    while min(weights[-1].shape) > 4 and weights[-1].min() < 1e-3:
        hh, ww = weights[-1].shape
        values.append(cv2.pyrDown(values[-1]).reshape((hh + 1) // 2, (ww + 1) // 2, c))
        weights.append(cv2.pyrDown(weights[-1]))
    if len(values) == 1:
        return image_HWC
    top_w = weights[-1][:, :, None]
    mean = values[-1].sum((0, 1)) / max(float(weights[-1].sum()), 1e-6)
    filled = np.where(top_w > 1e-6, values[-1] / np.maximum(top_w, 1e-6), mean).astype(np.float32)
    for level in range(len(values) - 2, -1, -1):
        hh, ww = weights[level].shape
        up = cv2.pyrUp(filled, dstsize=(ww, hh)).reshape(hh, ww, c)
        if level == 0:
            return up
        wl = weights[level][:, :, None]
        alpha = np.clip(wl * _ALPHA_GAIN, 0.0, 1.0)
        filled = alpha * (values[level] / np.maximum(wl, 1e-6)) + (1.0 - alpha) * up
    raise AssertionError("the loop returns at level 0")


def _hole(image_HWC: np.ndarray, vessel: np.ndarray, inside: np.ndarray, radius_px: np.ndarray) -> np.ndarray:
    """The vessels plus the margin that their blur (and label error) reaches, measured on this image.

    Ring k px outside the mask counts as vessel while its median contrast against a fill from beyond
    _MAX_MARGIN_PX is at least _TAIL_FRACTION of the vessels' own, of either sign: X-ray angiograms blur
    ~5 px out, sharp OCTA ~1 px, and a bright wall around a dark lumen (ultrasound) belongs to the vessel
    as much as its blur does. Wide vessels get _HOLE_MARGIN_PER_RADIUS * r on top, for their looser labels.
    """
    d_out, nearest = _nearest_labels(vessel)
    r_near = radius_px[vessel][nearest]
    wide = (d_out <= _MAX_MARGIN_PX) & inside
    fill = _coarse_fill(image_HWC, (~wide & inside).astype(np.float32))
    contrast_N = (image_HWC - fill).mean(2)[wide]
    d_N = d_out[wide]
    core = float(np.median(contrast_N[d_N == 0]))
    margin = _MIN_MARGIN_PX
    if abs(core) > 1e-3:
        for k in range(1, int(_MAX_MARGIN_PX)):
            ring = contrast_N[(d_N > k - 0.5) & (d_N <= k + 0.5)]
            if not len(ring) or abs(float(np.median(ring)) / core) < _TAIL_FRACTION:
                break
            margin = max(margin, k + 1.0)
    return vessel | (d_out <= margin + _HOLE_MARGIN_PER_RADIUS * r_near)


def _shifted(a: np.ndarray, dy: int, dx: int, fill: Any) -> np.ndarray:
    """out[y, x] = a[y + dy, x + dx] (fill where that falls off the image)."""
    out = np.full_like(a, fill)
    h, w = a.shape[:2]
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[yd, xd] = a[ys, xs]
    return out


def _remove(
    image: np.ndarray, vessel: np.ndarray, inside: np.ndarray, graph_radius: np.ndarray
) -> np.ndarray:
    """remove_vessels on checked inputs: float32 HxWxC, smooth fill + transplanted grain in the hole."""
    image_HWC = _as_hwc(image).astype(np.float32)
    radius = _hole_radius(vessel, graph_radius)
    hole = _hole(image_HWC, vessel, inside, radius) & inside
    valid = ~hole & inside
    out = image_HWC.copy()
    hole_y, hole_x = np.nonzero(hole)
    out[hole_y, hole_x] = _coarse_fill(image_HWC, valid.astype(np.float32))[hole_y, hole_x]
    # Grain: the smooth fill lacks the background's texture, which would leave a blurred trace of every
    # old vessel. Each hole pixel borrows the residual (image - fill of an equally shaped hole) at a
    # pixel one shift away where there is no vessel: the same statistics and bandwidth as the fill.
    # Three shifts cover ~97 % of the hole pixels on the real sets; the rest stay smooth.
    shift_px = int(np.ceil(2.0 * (float(radius.max()) + _MAX_MARGIN_PX))) + 2
    num_c = image_HWC.shape[2]
    grain = np.zeros((_NUM_SHIFTS, len(hole_y), num_c), np.float32)
    usable = np.zeros((_NUM_SHIFTS, len(hole_y)), bool)
    for k, (uy, ux) in enumerate(_SHIFT_DIRECTIONS[:_NUM_SHIFTS]):
        dy, dx = uy * shift_px, ux * shift_px
        sy, sx = hole_y + dy, hole_x + dx
        ok = (sy >= 0) & (sy < image.shape[0]) & (sx >= 0) & (sx < image.shape[1])
        ok[ok] = valid[sy[ok], sx[ok]]
        if not ok.any():
            continue
        hole_there = _shifted(hole, -dy, -dx, False)  # the hole, moved onto its grain's source
        fill_there = _coarse_fill(image_HWC, (valid & ~hole_there).astype(np.float32))
        grain[k, ok] = image_HWC[sy[ok], sx[ok]] - fill_there[sy[ok], sx[ok]]
        usable[k] = ok
    if usable.any():
        # A source straddling a strong edge (the optic disc's rim) carries the edge, not grain: sources
        # beyond _GRAIN_CLIP robust stds are passed over for the next shift, or clipped if all are.
        limit = _GRAIN_CLIP * np.maximum(_robust_std(grain[usable]), 0.5)
        calm = usable & (np.abs(grain) <= limit).all(2)
        pick = np.where(calm.any(0), np.argmax(calm, 0), np.argmax(usable, 0))
        chosen = np.clip(grain[pick, np.arange(len(hole_y))], -limit, limit)
        chosen[~usable.any(0)] = 0.0
        out[hole_y, hole_x] += chosen
    return out


def remove_vessels(image: np.ndarray, mask: np.ndarray, fov: np.ndarray | None = None) -> np.ndarray:
    """The image with the labelled vessels erased: same shape and dtype, pixels away from vessels kept.

    The vessels and a margin around them (2-8 px, as far as their blur or wall reaches, see _hole, plus 0.3
    radius) are filled from the surrounding background (push-pull pyramid fill, which follows the
    illumination), with the background's own grain copied in from nearby vessel-free pixels. Pixels
    outside the fov are left as they are and never used.
    """
    vessel, inside = _check_inputs(image, mask, fov)
    return _background(image, vessel, inside, _graph_radius(vessel))


def _background(
    image: np.ndarray, vessel: np.ndarray, inside: np.ndarray, graph_radius: np.ndarray
) -> np.ndarray:
    out = np.clip(np.rint(_remove(image, vessel, inside, graph_radius)), 0, 255).astype(np.uint8)
    return out.reshape(image.shape)


def remove_and_measure(
    image: np.ndarray, mask: np.ndarray, fov: np.ndarray | None = None
) -> tuple[np.ndarray, VesselProfile]:
    """(remove_vessels(image, mask, fov), measure_profile(image, mask, fov, that background)), with the mask
    decomposed once for both."""
    vessel, inside = _check_inputs(image, mask, fov)
    graph_radius = _graph_radius(vessel)
    background = _background(image, vessel, inside, graph_radius)
    return background, _measure(image, vessel, inside, background, graph_radius)


# --- measuring ----------------------------------------------------------------------------------------


def _robust_std(values_NC: np.ndarray) -> np.ndarray:
    med = np.median(values_NC, axis=0)
    return np.asarray(_MAD_TO_STD * np.median(np.abs(values_NC - med), axis=0), np.float64)


def _cell_medians(cell_N: np.ndarray, values_NC: np.ndarray, num_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """(median per cell and channel (num_cells, C), pixels per cell); cells without pixels hold 0."""
    count = np.bincount(cell_N, minlength=num_cells)
    starts = np.concatenate([[0], np.cumsum(count)[:-1]])
    has = count > 0
    lo = starts[has] + (count[has] - 1) // 2
    hi = starts[has] + count[has] // 2
    out = np.zeros((num_cells, values_NC.shape[1]), np.float64)
    for ch in range(values_NC.shape[1]):
        v = values_NC[:, ch]
        low, span = float(v.min()), float(v.max() - v.min())
        # One sort by cell, then value: the value scaled into [0, 0.999) is the fraction of the key.
        sorted_v = v[np.argsort(cell_N + (v - low) * (0.999 / max(span, 1e-12)))]
        out[has, ch] = 0.5 * (sorted_v[lo] + sorted_v[hi])
    return out, count


def _fill_table(table_RTC: np.ndarray, count_RT: np.ndarray) -> np.ndarray:
    """Empty cells filled: along t by interpolation between measured cells (0 past the last one, as no
    contrast was seen there), then whole empty radius bins from the nearest measured bin."""
    out = table_RTC.astype(np.float64).copy()
    num_r, num_t, num_c = out.shape
    t = np.arange(num_t, dtype=np.float64)
    rows = [i for i in range(num_r) if count_RT[i].any()]
    for i in rows:
        has = count_RT[i] > 0
        for ch in range(num_c):
            out[i, :, ch] = np.interp(t, t[has], out[i, has, ch], right=0.0)
    if not rows:
        return out.astype(np.float32)
    for i in range(num_r):
        if not count_RT[i].any():
            out[i] = out[min(rows, key=lambda j: abs(j - i))]
    return out.astype(np.float32)


def _bins(r: np.ndarray, t: np.ndarray, edges: np.ndarray, t_step: float) -> np.ndarray:
    num_t = int(round(_T_MAX / t_step))
    rb = np.clip(np.searchsorted(edges, r, side="right") - 1, 0, len(edges) - 2)
    tb = np.clip((t / t_step).astype(np.int64), 0, num_t - 1)
    return np.asarray(rb * num_t + tb, np.int64)


def _edge_blur_px(profile_RT: np.ndarray, count_RT: np.ndarray, centre_R: np.ndarray, t_step: float) -> float:
    """Gaussian sigma (px) of the edge: the 80 % -> 20 % fall of |contrast| spans 1.68 sigma (erf)."""
    t = (np.arange(profile_RT.shape[1]) + 0.5) * t_step
    blurs, weights = [], []
    for i in range(len(centre_R)):
        core = count_RT[i, t < 0.5].sum()
        if core < 20:
            continue
        c = np.abs(profile_RT[i])
        c0 = c[t < 0.5].max()
        if c0 <= 0:
            continue
        past = np.nonzero(t >= t[np.argmax(c[t < 0.5])])[0]
        e = np.where(
            t <= 1, -(1 - t) * max(centre_R[i], 0.5), (t - 1) * min(max(centre_R[i], 1.0), _OUT_UNIT_MAX_PX)
        )
        levels = []
        for frac in (0.8, 0.2):
            below = past[c[past] < frac * c0]
            if not len(below):
                break
            k = below[0]
            if k == 0:
                levels.append(e[0])
                continue
            a, b = c[k - 1], c[k]  # linear interpolation of the crossing between the two bins
            levels.append(e[k - 1] + (e[k] - e[k - 1]) * (a - frac * c0) / max(a - b, 1e-9))
        if len(levels) == 2:
            blurs.append((levels[1] - levels[0]) / 1.68)
            weights.append(core)
    return float(np.average(blurs, weights=weights)) if blurs else 0.0


def _high_pass(image_HWC: np.ndarray) -> np.ndarray:
    c = image_HWC.shape[2]
    return image_HWC - cv2.GaussianBlur(image_HWC, (0, 0), _GRAIN_SIGMA_PX).reshape(
        image_HWC.shape[:2] + (c,)
    )


def _white_noise_gain() -> float:
    """Std of _high_pass applied to unit white noise: 1 - 2 K(0) + sum K^2 for the Gaussian kernel K."""
    k = cv2.getGaussianKernel(2 * int(np.ceil(4 * _GRAIN_SIGMA_PX)) + 1, _GRAIN_SIGMA_PX).astype(np.float64)
    kernel = k @ k.T
    return float(np.sqrt(1.0 - 2.0 * kernel.max() + (kernel**2).sum()))


def measure_profile(
    image: np.ndarray, mask: np.ndarray, fov: np.ndarray | None = None, background: np.ndarray | None = None
) -> VesselProfile:
    """Measure the vessels of one real image: contrast per (radius, distance, channel), polarity, blur, grain.

    `background` is remove_vessels(image, mask, fov) (computed when None; remove_and_measure gives both).
    """
    vessel, inside = _check_inputs(image, mask, fov)
    graph_radius = _graph_radius(vessel)
    if background is None:
        background = _background(image, vessel, inside, graph_radius)
    _check_image(background, "background")
    if background.shape != image.shape:
        raise ValueError(f"background has shape {background.shape}, the image {image.shape}: they must match")
    return _measure(image, vessel, inside, background, graph_radius)


def _measure(
    image: np.ndarray,
    vessel: np.ndarray,
    inside: np.ndarray,
    background: np.ndarray,
    graph_radius: np.ndarray,
) -> VesselProfile:
    """measure_profile on checked inputs, with the mask's _graph_radius."""
    image_HWC, background_HWC = _as_hwc(image).astype(np.float32), _as_hwc(background).astype(np.float32)
    t, r = _geometry(vessel, graph_radius)
    near_y, near_x = np.nonzero((t < _T_MAX) & inside)
    if len(near_y) > _MAX_MEASURED:  # a fixed subsample: medians need no more, and sorting is the cost
        keep = np.sort(np.random.default_rng(0).choice(len(near_y), _MAX_MEASURED, replace=False))
        near_y, near_x = near_y[keep], near_x[keep]
    edges = np.asarray(_RADIUS_EDGES_PX, np.float64)
    num_r, num_t = len(edges) - 1, int(round(_T_MAX / _T_STEP))
    t_N, r_N = t[near_y, near_x], r[near_y, near_x]
    cell = _bins(r_N, t_N, edges, _T_STEP)
    i_NC = image_HWC[near_y, near_x].astype(np.float64)
    b_NC = background_HWC[near_y, near_x].astype(np.float64)
    c_log = np.log((i_NC + 1.0) / (b_NC + 1.0))
    c_add = i_NC - b_NC
    med_log, count = _cell_medians(cell, c_log, num_r * num_t)
    med_add, _ = _cell_medians(cell, c_add, num_r * num_t)
    # Which model predicts the vessel pixels better, in grey levels (each with its own medians).
    on_vessel = t_N <= 1.0
    pred_log = (b_NC + 1.0) * np.exp(med_log[cell]) - 1.0
    pred_add = b_NC + med_add[cell]
    error_log = float(np.abs(i_NC - pred_log)[on_vessel].mean())
    error_add = float(np.abs(i_NC - pred_add)[on_vessel].mean())
    model: Model = "log" if error_log <= error_add else "add"
    count_RT = count.reshape(num_r, num_t)
    table_log = _fill_table(med_log.reshape(num_r, num_t, -1), count_RT)
    table_add = _fill_table(med_add.reshape(num_r, num_t, -1), count_RT)
    rb = cell // num_t
    centre = 0.5 * (edges[:-1] + np.minimum(edges[1:], edges[:-1] * 1.5 + 1.0))
    for i in np.unique(rb).tolist():
        centre[i] = float(np.median(r_N[rb == i]))
    core = t_N < 0.5
    # the vessels' centres, or (a graph whose radii overshoot the mask leaves none) every vessel pixel
    polarity = 1 if float(c_add[core if core.any() else on_vessel].mean()) > 0 else -1
    blur = _edge_blur_px(table_add.mean(2), count_RT, centre, _T_STEP)
    # Grain inside vessels beyond what drawing onto this background already brings: the high-pass
    # variance of the real vessel cores minus that of the noiseless prediction there (which holds the
    # profile's own curvature and the background's grain as the model scales it).
    predicted_HWC = background_HWC.copy()
    predicted_HWC[near_y, near_x] = (pred_log if model == "log" else pred_add).astype(np.float32)
    thick = core & (r_N >= 1.5)
    grain_at = thick if thick.sum() >= 50 else core
    gy, gx = near_y[grain_at], near_x[grain_at]
    real_var = _robust_std(_high_pass(image_HWC)[gy, gx]) ** 2
    model_var = _robust_std(_high_pass(predicted_HWC)[gy, gx]) ** 2
    noise = np.sqrt(np.maximum(real_var - model_var, 0.0)) / _white_noise_gain()
    return VesselProfile(
        radius_edges_px=edges,
        radius_centre_px=centre,
        t_step=_T_STEP,
        contrast_log_RTC=table_log,
        contrast_add_RTC=table_add,
        count_RT=count_RT.astype(np.int64),
        model=model,
        error_log=error_log,
        error_add=error_add,
        polarity=polarity,
        edge_blur_px=blur,
        noise_std_C=noise,
    )


def merge_profiles(profiles: list[VesselProfile]) -> VesselProfile:
    """One profile from several shots: tables averaged cell by cell, weighted by pixels measured."""
    if not profiles:
        raise ValueError("merge_profiles: got no profiles; pass the profiles of one or more shots")
    first = profiles[0]
    for k, p in enumerate(profiles[1:], 1):
        if p.contrast_log_RTC.shape != first.contrast_log_RTC.shape or not np.array_equal(
            p.radius_edges_px, first.radius_edges_px
        ):
            raise ValueError(
                f"merge_profiles: profile {k} has {p.num_channels} channel(s) and table "
                f"{p.contrast_log_RTC.shape}, profile 0 {first.num_channels} and "
                f"{first.contrast_log_RTC.shape}; "
                "grey and colour shots cannot be merged"
            )
    count = np.stack([p.count_RT for p in profiles]).astype(np.float64)  # (K, R, T)
    total = count.sum(0)
    # Interpolated cells (count 0) get a tiny weight, so a cell no shot measured averages their fills.
    w = (count + 1e-6)[..., None]

    def avg(name: str) -> np.ndarray:
        return np.asarray((np.stack([getattr(p, name) for p in profiles]) * w).sum(0) / w.sum(0), np.float32)

    pixels = np.array([p.count_RT.sum() for p in profiles], np.float64)
    error_log = float(np.average([p.error_log for p in profiles], weights=pixels))
    error_add = float(np.average([p.error_add for p in profiles], weights=pixels))
    count_r = count.sum(2)  # (K, R)
    centre = (np.stack([p.radius_centre_px for p in profiles]) * (count_r + 1e-6)).sum(0) / (
        count_r + 1e-6
    ).sum(0)
    table_add = avg("contrast_add_RTC")
    core = (np.arange(table_add.shape[1]) + 0.5) * first.t_step < 0.5
    core_mean = float((table_add[:, core].mean(2) * total[:, core]).sum())
    noise = np.sqrt(np.average([p.noise_std_C**2 for p in profiles], axis=0, weights=pixels))
    return VesselProfile(
        radius_edges_px=first.radius_edges_px.copy(),
        radius_centre_px=centre,
        t_step=first.t_step,
        contrast_log_RTC=avg("contrast_log_RTC"),
        contrast_add_RTC=table_add,
        count_RT=total.astype(np.int64),
        model="log" if error_log <= error_add else "add",
        error_log=error_log,
        error_add=error_add,
        polarity=1 if core_mean > 0 else -1,
        edge_blur_px=float(np.average([p.edge_blur_px for p in profiles], weights=pixels)),
        noise_std_C=noise,
    )


# --- drawing ------------------------------------------------------------------------------------------


def _axis(x: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, upper weight) of linear interpolation of x between sorted centres."""
    hi = (
        np.clip(np.searchsorted(centres, x), 1, len(centres) - 1)
        if len(centres) > 1
        else np.zeros_like(x, int)
    )
    lo = np.maximum(hi - 1, 0)
    span = centres[hi] - centres[lo]
    frac = np.where(span > 0, (x - centres[lo]) / np.where(span > 0, span, 1.0), 0.0)
    return lo, hi, np.clip(frac, 0.0, 1.0)


def _lookup(profile: VesselProfile, r: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Contrast (N, C) of the chosen model at radii r and normalised distances t, bilinear."""
    table = profile.contrast_RTC.astype(np.float64)
    centre = np.maximum(profile.radius_centre_px, 1e-3)
    r0, r1, fr = _axis(np.log(np.maximum(r, 1e-3)), np.log(centre))
    t_centre = (np.arange(table.shape[1]) + 0.5) * profile.t_step
    t0, t1, ft = _axis(t, t_centre)
    fr, ft = fr[:, None], ft[:, None]
    c = (
        table[r0, t0] * (1 - fr) * (1 - ft)
        + table[r0, t1] * (1 - fr) * ft
        + table[r1, t0] * fr * (1 - ft)
        + table[r1, t1] * fr * ft
    )
    # Partial volume: a vessel thinner than any measured one covers that much less of its pixels.
    c *= np.clip(r / centre[0], 0.0, 1.0)[:, None]
    # Fade to nothing over the last half unit of t, so the drawn region has no visible border.
    c *= np.clip((_T_MAX - t) / 0.5, 0.0, 1.0)[:, None]
    return np.asarray(c)


def clip_to_fov(
    mask: np.ndarray, radius_px: np.ndarray, fov: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(mask, radius_px) with the vessels outside the fov removed: the label of a composite made by
    draw_vessels, which leaves pixels outside the fov untouched. fov None: returned unchanged."""
    _check_map(mask, "mask", mask.shape, np.uint8)
    _check_map(radius_px, "radius_px", mask.shape, np.float32)
    if fov is None:
        return mask, radius_px
    _check_map(fov, "fov", mask.shape, np.uint8)
    outside = fov == 0
    return np.where(outside, np.uint8(0), mask), np.where(outside, np.float32(0), radius_px)


def draw_vessels(
    background: np.ndarray,
    mask: np.ndarray,
    radius_px: np.ndarray,
    profile: VesselProfile,
    rng: np.random.Generator,
    fov: np.ndarray | None = None,
) -> np.ndarray:
    """Draw the vessels of `mask` (radii `radius_px`, as render_mask returns them) into `background`.

    Contrast at each pixel is the profile's at its (radius, normalised distance), applied by the profile's
    model, scaled by a per-sample jitter (global 1 +- 15 %, times a smooth +- ~8 % field) and topped with
    the measured vessel grain. Pixels outside the fov are returned unchanged; the label of the result is
    clip_to_fov(mask, radius_px, fov)[0], which the caller computes (vessels outside the fov are not drawn).
    """
    vessel, inside = _check_inputs(background, mask, fov, image_name="background")
    _check_map(radius_px, "radius_px", mask.shape, np.float32)
    if not np.isfinite(radius_px).all() or (radius_px[vessel] <= 0).any():
        raise ValueError(
            "radius_px must be finite and > 0 at every vessel pixel of mask (render_mask's output)"
        )
    channels = 1 if background.ndim == 2 else 3
    if profile.num_channels != channels:
        raise ValueError(
            f"profile was measured on {profile.num_channels}-channel images, background has {channels}: "
            "measure the profile on images of the same kind"
        )
    t, r = _geometry(vessel & inside, np.where(inside, radius_px, np.float32(0)))
    near = (t < _T_MAX) & inside
    c = _lookup(profile, r[near], t[near])
    h, w = mask.shape
    cells = max(2, round(_FIELD_CELLS * min(h, w) / max(h, w)))
    coarse = rng.normal(0.0, 1.0, (cells, _FIELD_CELLS) if h <= w else (_FIELD_CELLS, cells)).astype(
        np.float32
    )
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)[near]
    c *= (rng.uniform(1 - _JITTER, 1 + _JITTER) * (1.0 + _FIELD * field))[:, None]
    base = _as_hwc(background)[near].astype(np.float64)
    if profile.model == "log":
        out = (base + 1.0) * np.exp(c) - 1.0
    else:
        out = base + c
    # Grain on the vessel itself, fading out over the blurred edge.
    weight = np.clip(2.0 * (1.25 - t[near]), 0.0, 1.0)[:, None]
    out += rng.normal(0.0, 1.0, out.shape) * profile.noise_std_C[None, :] * weight
    image = _as_hwc(background).copy()
    image[near] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return cast(np.ndarray, image.reshape(background.shape))

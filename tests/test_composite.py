"""Real-background compositing: vessel removal, profile measurement, drawing new vessels, input checks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from data_engine.composite import (
    VesselProfile,
    clip_to_fov,
    draw_vessels,
    measure_profile,
    merge_profiles,
    remove_and_measure,
    remove_vessels,
)
from data_engine.graph import decompose, flip, graph_from_polylines, render_mask

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZE_PX = 96


def _vessels(shift_px: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Mask and radius map of three vessels (radius 2.5, 1.5, 0.5 px) crossing a SIZE_PX canvas."""
    x = np.linspace(4, SIZE_PX - 5, 40)
    lines = [
        np.stack([x, 30 + 8 * np.sin(x / 15) + shift_px], 1),
        np.stack([x, 62 + shift_px + 0 * x], 1),
        np.stack([20 + 0 * x + shift_px, x], 1),
    ]
    radii = [np.full(40, 2.5), np.full(40, 1.5), np.full(40, 0.5)]
    return render_mask(graph_from_polylines(lines, radii), (SIZE_PX, SIZE_PX))


def _scene(contrast: float, bright: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true background float, image uint8, mask): smooth background, soft-edged vessels of `contrast`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE_PX, :SIZE_PX].astype(np.float64)
    if bright:  # OCTA-like: dim background, vessels add light
        background = 25 + 10 * xx / SIZE_PX + rng.normal(0, 2, (SIZE_PX, SIZE_PX))
    else:  # fundus/X-ray-like: illumination gradient, vessels absorb a fraction of it
        background = 120 + 60 * xx / SIZE_PX + 20 * np.sin(yy / 30) + rng.normal(0, 2, (SIZE_PX, SIZE_PX))
    mask, _ = _vessels()
    soft = cv2.GaussianBlur(mask.astype(np.float64) / 255, (0, 0), 0.8)
    image = background + contrast * soft if bright else background * (1 - contrast * soft)
    return background, np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def _near_vessels(mask: np.ndarray, px: int) -> np.ndarray:
    return cv2.dilate(mask, np.ones((2 * px + 1, 2 * px + 1), np.uint8)) > 0


def test_remove_vessels_restores_the_background_and_keeps_the_rest() -> None:
    background, image, mask = _scene(contrast=0.4)
    removed = remove_vessels(image, mask)
    assert removed.shape == image.shape and removed.dtype == np.uint8
    vessel = mask > 0
    error = np.abs(removed.astype(np.float64) - background)[vessel].mean()
    drawn_contrast = np.abs(image.astype(np.float64) - background)[vessel].mean()
    assert drawn_contrast > 20 and error < 4.0, (drawn_contrast, error)
    far = ~_near_vessels(mask, 12)
    assert np.array_equal(removed[far], image[far])


def test_measure_profile_recovers_dark_polarity_and_contrast() -> None:
    _, image, mask = _scene(contrast=0.4)
    profile = measure_profile(image, mask)
    assert profile.polarity == -1 and profile.num_channels == 1
    assert profile.model == "log"  # the vessels scale with the illumination gradient
    # Radius 2.5 px vessel on its centreline: the blurred disc keeps most of the 40 % absorption.
    row = int(np.searchsorted(profile.radius_edges_px, 2.5, side="right") - 1)
    centre = float(np.exp(profile.contrast_log_RTC[row, 0, 0]))
    assert 0.55 < centre < 0.75, centre
    # Contrast fades with distance: nothing left two radii beyond the edge.
    assert abs(profile.contrast_log_RTC[row, -1, 0]) < 0.05


def test_draw_vessels_on_the_removed_background_reproduces_the_image() -> None:
    _, image, mask = _scene(contrast=0.4)
    background = remove_vessels(image, mask)
    profile = measure_profile(image, mask, background=background)
    _, radius_px = _vessels()
    drawn = draw_vessels(background, mask, radius_px, profile, np.random.default_rng(0))
    near = _near_vessels(mask, 2)
    error = np.abs(drawn.astype(np.float64) - image)[near].mean()
    contrast = np.abs(background.astype(np.float64) - image)[mask > 0].mean()
    assert error < 0.12 * contrast, (error, contrast)
    # Fresh vessels somewhere else are dark too, and the background is untouched away from them.
    new_mask, new_radius = _vessels(shift_px=12)
    composite = draw_vessels(background, new_mask, new_radius, profile, np.random.default_rng(1))
    new = (new_mask > 0) & ~_near_vessels(mask, 3)
    assert (composite[new].astype(np.float64) - background[new]).mean() < -20
    far = ~_near_vessels(new_mask, 12)
    assert np.array_equal(composite[far], background[far])


def test_bright_vessels_are_measured_and_drawn_bright() -> None:
    _, image, mask = _scene(contrast=120, bright=True)
    background = remove_vessels(image, mask)
    profile = measure_profile(image, mask, background=background)
    assert profile.polarity == 1
    assert profile.model == "add"  # light added over a dim background, not a fraction of it
    new_mask, new_radius = _vessels(shift_px=12)
    composite = draw_vessels(background, new_mask, new_radius, profile, np.random.default_rng(0))
    new = (new_mask > 0) & ~_near_vessels(mask, 3)
    assert (composite[new].astype(np.float64) - background[new]).mean() > 50


@pytest.mark.parametrize("axes_px", [(22, 22), (30, 18)])
def test_a_lumen_cut_across_is_measured_and_drawn(axes_px: tuple[int, int]) -> None:
    """One wide, dark lumen (an artery across an ultrasound frame) is measured dark and drawn dark elsewhere:
    before wide vessels took the medial-axis radius, its graph's radii overshot the mask, no pixel was a
    vessel centre and the profile's polarity and the drawn image came out NaN."""
    rng = np.random.default_rng(0)
    h, w = 160, 200
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    background = 110 + 40 * np.sin(yy / 25) + rng.normal(0, 6, (h, w))
    mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(mask, (60, 80), axes_px, 25, 0, 360, 255, -1)
    soft = cv2.GaussianBlur(mask.astype(np.float64) / 255, (0, 0), 1.0)
    image = np.clip(np.rint(background * (1 - 0.9 * soft)), 0, 255).astype(np.uint8)
    removed = remove_vessels(image, mask)
    profile = measure_profile(image, mask, background=removed)
    assert profile.polarity == -1
    assert np.isfinite(profile.contrast_log_RTC).all() and np.isfinite(profile.contrast_add_RTC).all()
    new_mask = np.zeros((h, w), np.uint8)
    cv2.ellipse(new_mask, (145, 85), axes_px, -40, 0, 360, 255, -1)
    new_mask, new_radius = render_mask(decompose(new_mask), (h, w))
    drawn = draw_vessels(removed, new_mask, new_radius, profile, np.random.default_rng(1))
    lumen = (new_mask > 0) & ~_near_vessels(mask, 3)
    assert (drawn[lumen].astype(np.float64) - removed[lumen]).mean() < -50
    far = ~_near_vessels(new_mask, 2 * max(axes_px) + 2)
    assert np.array_equal(drawn[far], removed[far])


def _ring(mask: np.ndarray, inner_px: float, outer_px: float) -> np.ndarray:
    """Pixels whose distance to the mask is in (inner_px, outer_px]."""
    d = cv2.distanceTransform((mask == 0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return (d > inner_px) & (d <= outer_px)


def test_a_lumens_wall_is_erased_from_the_shot_and_drawn_on_new_lumens() -> None:
    """A dark lumen 44 px across whose bright wall (2.5 px, unlabelled, as in ultrasound) lies just outside
    its label: the wall goes with the lumen when it is erased, and new lumens are drawn with one. Before the
    ring test took rings of either sign and the hole its radius from the graph, the wall stayed in the
    background as a ghost ring, and the profile, measured against it, drew new lumens without a wall."""
    rng = np.random.default_rng(0)
    h, w = 160, 220
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    background = 120 + 25 * np.sin(yy / 30) + rng.normal(0, 5, (h, w))
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, (60, 80), 22, 255, -1)
    wall = _ring(mask, 0.0, 2.5)
    image = background.copy()
    image[mask > 0] *= 0.15
    image[wall] += 80
    image = np.clip(np.rint(cv2.GaussianBlur(image, (0, 0), 0.7)), 0, 255).astype(np.uint8)
    removed = remove_vessels(image, mask)
    assert abs((removed[wall].astype(np.float64) - background[wall]).mean()) < 12  # the wall was +80
    profile = measure_profile(image, mask, background=removed)
    new_mask = np.zeros((h, w), np.uint8)
    cv2.circle(new_mask, (165, 75), 18, 255, -1)
    new_mask, new_radius = render_mask(decompose(new_mask), (h, w))
    drawn = draw_vessels(removed, new_mask, new_radius, profile, np.random.default_rng(1))
    new_wall = _ring(new_mask, 0.0, 2.5)
    assert (drawn[new_wall].astype(np.float64) - removed[new_wall]).mean() > 40
    beyond = _ring(new_mask, 6.0, 12.0)  # the wall is drawn thin, not smeared over the grid's steps
    assert abs((drawn[beyond].astype(np.float64) - removed[beyond]).mean()) < 10


def test_remove_and_measure_equals_the_two_calls() -> None:
    _, image, mask = _scene(contrast=0.4)
    background, profile = remove_and_measure(image, mask)
    assert np.array_equal(background, remove_vessels(image, mask))
    assert profile.to_json() == measure_profile(image, mask, background=background).to_json()
    assert profile.to_json() == measure_profile(image, mask).to_json()


def test_colour_profiles_round_trip_through_json_and_merge() -> None:
    _, grey, mask = _scene(contrast=0.4)
    # A BGR image whose blue channel has half the vessel contrast of the green.
    image = np.stack([(grey * 0.5 + 60).astype(np.uint8), grey, (grey * 0.2 + 200).astype(np.uint8)], 2)
    profile = measure_profile(image, mask)
    assert profile.num_channels == 3 and profile.polarity == -1
    again = VesselProfile.from_json(profile.to_json())
    assert np.array_equal(again.contrast_log_RTC, profile.contrast_log_RTC)
    assert again.model == profile.model and np.isinf(again.radius_edges_px[-1])
    merged = merge_profiles([profile, again])
    np.testing.assert_allclose(merged.contrast_log_RTC, profile.contrast_log_RTC, atol=1e-5)
    drawn = draw_vessels(remove_vessels(image, mask), mask, _vessels()[1], merged, np.random.default_rng(0))
    assert drawn.shape == image.shape
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_profiles([profile, measure_profile(grey, mask)])
    with pytest.raises(ValueError, match="not a VesselProfile"):
        VesselProfile.from_json('{"model": "log"}')


def test_pixels_outside_the_fov_stay_as_they_are() -> None:
    _, image, mask = _scene(contrast=0.4)
    fov = np.zeros_like(mask)
    cv2.circle(fov, (SIZE_PX // 2, SIZE_PX // 2), SIZE_PX // 2 - 8, 255, -1)
    image[fov == 0] = 0  # a fundus camera's black surround
    removed = remove_vessels(image, mask, fov)
    assert np.array_equal(removed[fov == 0], image[fov == 0])
    profile = measure_profile(image, mask, fov, removed)
    assert profile.polarity == -1
    new_mask, new_radius = clip_to_fov(*_vessels(shift_px=12), fov)
    assert not new_mask[fov == 0].any() and not new_radius[fov == 0].any() and new_mask.any()
    composite = draw_vessels(removed, new_mask, new_radius, profile, np.random.default_rng(0), fov)
    assert np.array_equal(composite[fov == 0], removed[fov == 0])


def test_bad_inputs_raise_value_errors_naming_them() -> None:
    _, image, mask = _scene(contrast=0.4)
    profile = measure_profile(image, mask)
    _, radius_px = _vessels()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="image must be a uint8"):
        remove_vessels(image.astype(np.float32), mask)
    with pytest.raises(ValueError, match="mask must be uint8 of shape"):
        remove_vessels(image, mask[:-1])
    with pytest.raises(ValueError, match="mask is empty"):
        measure_profile(image, np.zeros_like(mask))
    with pytest.raises(ValueError, match="fov is empty"):
        remove_vessels(image, mask, np.zeros_like(mask))
    with pytest.raises(ValueError, match="HxW or HxWx3"):
        remove_vessels(np.zeros((SIZE_PX, SIZE_PX, 4), np.uint8), mask)
    with pytest.raises(ValueError, match="background has shape"):
        measure_profile(image, mask, background=image[:, :-1])
    with pytest.raises(ValueError, match="radius_px must be float32"):
        draw_vessels(image, mask, radius_px.astype(np.float64), profile, rng)
    with pytest.raises(ValueError, match="radius_px must be finite and > 0"):
        draw_vessels(image, mask, np.zeros_like(radius_px), profile, rng)
    with pytest.raises(ValueError, match="1-channel images, background has 3"):
        draw_vessels(np.dstack([image] * 3), mask, radius_px, profile, rng)


def test_real_fundus_composite_has_the_measured_polarity() -> None:
    csv_path = DATA / "CHASE_DB1" / "pairs.csv"
    if not csv_path.is_file():
        pytest.skip(f"real data not found at {csv_path} (only on development machines)")
    from data_engine.ingest import load_case, read_task

    image, mask, fov = load_case(read_task(csv_path).cases[0])
    background = remove_vessels(image, mask, fov)
    profile = measure_profile(image, mask, fov, background)
    assert profile.polarity == -1  # fundus vessels absorb light
    h, w = mask.shape
    new_mask, new_radius = clip_to_fov(*render_mask(flip(decompose(mask), "x", w), (h, w)), fov)
    composite = draw_vessels(background, new_mask, new_radius, profile, np.random.default_rng(0), fov)
    # Vessel pixels of the mirrored tree, away from the old vessels, against the background there.
    new = (new_mask > 0) & (mask == 0)
    green = 1  # BGR: fundus vessels show most in green
    delta = composite[new, green].astype(np.float64) - background[new, green]
    assert np.sign(delta.mean()) == profile.polarity and (delta < 0).mean() > 0.8
    assert np.array_equal(composite[fov == 0], image[fov == 0])

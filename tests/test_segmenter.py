"""finetune.sampler and finetune.segmenter: network input, patch sampling (foreground oversampling, exact
geometry), tiny trainings of every architecture, save/load, the threshold, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from finetune_testdata import collimated_pair, vessel_pair

from finetune.config import (
    ARCHITECTURES,
    AugmentConfig,
    InputConfig,
    NetConfig,
    OptimConfig,
    PatchConfig,
    SegmenterConfig,
)
from finetune.sampler import PatchPool, prepare_image, prepare_mask
from finetune.segmenter import (
    THRESHOLDS,
    Segmenter,
    area_threshold,
    build_network,
    choose_threshold,
    train_segmenter,
)

NO_AUGMENT = AugmentConfig(
    flip_prob=0, rot90_prob=0, rotate_prob=0, scale_prob=0, gamma_prob=0, contrast_prob=0,
    brightness_prob=0, noise_prob=0, blur_prob=0,
)  # fmt: skip


def tiny_config(arch: str = "unet", steps: int = 3, **patch: float) -> SegmenterConfig:
    swin = arch == "swin_unetr"
    return SegmenterConfig(
        net=NetConfig(arch=arch, base_channels=12 if swin else 8, num_levels=3, backbone="resnet10"),  # type: ignore[arg-type]
        patch=PatchConfig(patch_size_px=64 if swin else 32, batch_size=4, **patch),  # type: ignore[arg-type]
        optim=OptimConfig(max_steps=steps, warmup_steps=1, lr=1e-3),
        log_every_steps=2,
    )


def real_cases(num: int, seed: int = 0, colour: bool = True) -> list[tuple[np.ndarray, np.ndarray, None]]:
    rng = np.random.default_rng(seed)
    return [(*vessel_pair(rng, 45 + 7 * i, 52, colour), None) for i in range(num)]


# --- network input ---


def test_prepare_image_channels_and_normalisation() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    x = prepare_image(grey)
    assert x.shape == (3, 20, 30) and x.dtype == np.float32
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[0], x[2])  # grey replicated
    assert abs(float(x[0].mean())) < 1e-4 and abs(float(x[0].std()) - 1) < 1e-3
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[:, :4, 2] = 200  # red in the left half (BGR order in, RGB out)
    y = prepare_image(bgr)
    assert y[0, 0, 0] > 0 > y[0, 0, 7]  # channel 0 is red
    assert not y[1].any() and not y[2].any()  # constant channels become 0
    assert prepare_image(grey, max_side_px=15).shape == (3, 10, 15)
    with pytest.raises(ValueError, match="uint8"):
        prepare_image(grey.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        prepare_image(np.zeros((4, 4, 2), np.uint8))


def test_prepare_mask_keeps_thin_vessels_when_resized() -> None:
    mask = np.zeros((40, 40), np.uint8)
    mask[:, 19:21] = 255  # 2 px wide, half a pixel after halving... rounded to 1 px
    small = prepare_mask(mask, 20, 20)
    assert small.shape == (20, 20) and set(np.unique(small)) == {0, 1}
    assert small[:, 9:11].any(axis=1).all()  # the vessel survives along its length


# --- patch sampling ---


def test_patch_without_augmentation_is_an_exact_crop() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 50, 60)).astype(np.float32)
    mask = np.zeros((50, 60), np.uint8)
    mask[25, 30] = 1  # one vessel pixel, far enough from the border that no clamping happens
    pool = PatchPool()
    pool.add(image, mask)
    patches, masks = pool.sample(rng, 3, patch_size_px=16, foreground_fraction=1.0, augment=None)
    for n in range(3):
        assert np.array_equal(patches[n], image[:, 17:33, 22:38])  # centred: 25 - 8 .. 25 + 8
        assert masks[n, 0, 8, 8] == 1 and masks[n].sum() == 1


def test_geometric_augmentation_keeps_image_and_mask_aligned() -> None:
    rng = np.random.default_rng(1)
    _, mask = vessel_pair(rng, 64, 64, colour=False)
    image = np.repeat((mask > 0).astype(np.float32)[None], 3, axis=0)  # the image is its own label
    pool = PatchPool()
    pool.add(image, mask)
    exact = AugmentConfig(rotate_prob=0, scale_prob=0, gamma_prob=0, contrast_prob=0, brightness_prob=0,
                          noise_prob=0, blur_prob=0, flip_prob=0.5, rot90_prob=1.0)  # fmt: skip
    patches, masks = pool.sample(rng, 16, 32, 0.5, exact)
    assert np.array_equal(patches[:, :1] > 0.5, masks > 0.5)  # mirrors and rot90 are exact
    smooth = AugmentConfig(rotate_prob=1.0, scale_prob=1.0, gamma_prob=0, contrast_prob=0, brightness_prob=0,
                           noise_prob=0, blur_prob=0)  # fmt: skip
    patches, masks = pool.sample(rng, 16, 32, 0.5, smooth)
    agreement = float(((patches[:, :1] >= 0.5) == (masks > 0.5)).mean())
    assert agreement == 1.0  # same warp, same interpolation, same threshold


def test_zoom_out_area_averages_like_a_lower_resolution() -> None:
    # Halving: the patch is the twice larger crop about its centre averaged over 2x2 pixels, as a scan at
    # half the resolution shows it. A one-pixel vessel keeps half its contrast in one patch column; sampling
    # every other pixel would drop it whole or keep it whole, depending on the column the centre falls on.
    image = np.zeros((3, 80, 80), np.float32)
    image[:, :, 41] = 1.0
    mask = np.zeros((80, 80), np.uint8)
    mask[30:50, 40:42] = 1  # centres on rows 30..49 and columns 40 or 41: the crop stays inside the image
    pool = PatchPool()
    pool.add(image, mask)
    halve = AugmentConfig(
        flip_prob=0, rot90_prob=0, rotate_prob=0, scale_prob=1.0, scale_range=(0.5, 0.5), gamma_prob=0,
        contrast_prob=0, brightness_prob=0, noise_prob=0, blur_prob=0,
    )  # fmt: skip
    patches, masks = pool.sample(np.random.default_rng(0), 8, patch_size_px=16, foreground_fraction=1.0,
                                 augment=halve)  # fmt: skip
    expected = np.zeros((3, 16, 16), np.float32)
    expected[:, :, 8] = 0.5  # crop columns 16 and 17 (or 15 and 16) from the centre column 40 (or 41)
    for n in range(8):
        assert np.array_equal(patches[n], expected)
        assert masks[n, 0, :, 8].sum() >= 8  # the label rows the patch reaches
        assert not masks[n, 0, :, :7].any() and not masks[n, 0, :, 9:].any()


def test_field_cut_darkens_beyond_an_edge_and_clears_the_mask_there() -> None:
    rng = np.random.default_rng(3)
    image = rng.normal(size=(3, 64, 64)).astype(np.float32)
    mask = np.ones((64, 64), np.uint8)  # vessel everywhere: every cleared pixel shows
    pool = PatchPool()
    pool.add(image, mask)
    cut_only = AugmentConfig(**{**NO_AUGMENT.__dict__, "field_cut_prob": 1.0})
    shares = []
    for seed in range(64):
        # one patch per seed: the draws before the cut are the plain patch's, so the crops are the same
        patch, cut_mask = pool.sample(np.random.default_rng(seed), 1, 32, 0.0, cut_only)
        plain, plain_mask = pool.sample(np.random.default_rng(seed), 1, 32, 0.0, NO_AUGMENT)
        assert plain_mask.all()
        gone = cut_mask[0, 0] == 0
        shares.append(float(gone.mean()))
        # 4 px or more inside the edge (past its 1-3 px fade) the patch is untouched; 4 px or more beyond
        # it, it is flat and no brighter than the patch's minimum
        inner = cv2.erode((~gone).astype(np.uint8), np.ones((9, 9), np.uint8), borderValue=1) > 0
        outer = cv2.erode(gone.astype(np.uint8), np.ones((9, 9), np.uint8), borderValue=1) > 0
        assert inner.any() and np.array_equal(patch[0][:, inner], plain[0][:, inner])
        if outer.sum() >= 10:
            assert patch[0][:, outer].mean() < plain.min() + 0.05
            assert patch[0][:, outer].std() < 0.2 < plain.std()
    assert 0 < min(shares) and max(shares) < 1  # every edge crosses its patch
    assert 0.2 < float(np.mean(shares)) < 0.8
    assert AugmentConfig().field_cut_prob == 0.0  # off unless a profile turns it on
    with pytest.raises(ValueError, match="field_cut_prob"):
        AugmentConfig(field_cut_prob=1.5)


def test_foreground_oversampling_raises_the_vessel_share_of_patches() -> None:
    # one short thin artery in a large image: uniform patches rarely see it
    mask = np.zeros((256, 256), np.uint8)
    mask[100:140, 60:62] = 1
    image = np.zeros((3, 256, 256), np.float32)
    pool = PatchPool()
    pool.add(image, mask)

    def measure(fraction: float) -> tuple[float, float]:
        rng = np.random.default_rng(0)
        _, masks = pool.sample(rng, 400, 32, fraction, AugmentConfig())
        return float((masks.reshape(400, -1).max(axis=1) > 0).mean()), float(masks.mean())

    uniform_hits, uniform_pixels = measure(0.0)
    over_hits, over_pixels = measure(0.5)
    always_hits, _ = measure(1.0)
    assert uniform_hits < 0.15  # the artery's neighbourhood is ~4% of the image
    assert over_hits > uniform_hits + 0.3
    assert over_pixels > 3 * uniform_pixels
    assert always_hits > 0.95  # centred on a vessel pixel; rotation/zoom keep the centre


def test_ring_pool_replaces_the_oldest_case() -> None:
    pool = PatchPool(max_cases=2)
    for value in (1.0, 2.0, 3.0):
        pool.add(np.full((3, 8, 8), value, np.float32), np.ones((8, 8), np.uint8))
    assert len(pool) == 2 and pool.num_added == 3
    patches, _ = pool.sample(np.random.default_rng(0), 20, 8, 0.0)
    assert set(np.unique(patches)) == {2.0, 3.0}
    with pytest.raises(ValueError, match="no cases"):
        PatchPool().sample(np.random.default_rng(0), 1, 8, 0.0)


# --- training, prediction, save / load ---


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_training_each_architecture_round_trips(arch: str, tmp_path: Path) -> None:
    cfg = tiny_config(arch)
    cases = real_cases(2)
    synthetic = [vessel_pair(np.random.default_rng(9), 40, 40, colour=False)]
    seg = train_segmenter(cfg, cases, synthetic=synthetic, model_dir=tmp_path / "model", progress=False)
    assert math.isfinite(seg.record["final_loss"]) and seg.record["steps"] == 3
    assert seg.record["batch_real_synthetic"] == [2, 2]
    image = cases[1][0]  # 52 px high, 52 wide: not a multiple of the window
    prob = seg.predict_proba(image)
    assert prob.shape == image.shape[:2] and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    small = cases[0][0][:20, :25]  # smaller than the window: padded, then cropped back
    assert seg.predict_proba(small).shape == (20, 25)
    loaded = Segmenter.load(tmp_path / "model", device="cpu")
    assert loaded.threshold == seg.threshold and loaded.cfg == cfg
    assert np.array_equal(loaded.predict_proba(image), prob)
    assert np.array_equal(loaded.predict(image), seg.predict(image))
    assert set(np.unique(seg.predict(image))) <= {0, 255}
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    assert meta["format"] == "univg-segmenter/1" and meta["segmenter"]["net"]["arch"] == arch


def test_training_is_seeded_and_learns_on_an_easy_task() -> None:
    cfg = tiny_config("unet", steps=40)
    cases = real_cases(2, colour=False)
    a = train_segmenter(cfg, cases, progress=False)
    b = train_segmenter(cfg, cases, progress=False)
    assert [h["loss"] for h in a.record["history"]] == [h["loss"] for h in b.record["history"]]
    for pa, pb in zip(a.network.parameters(), b.network.parameters(), strict=True):
        assert torch.equal(pa, pb)
    first, last = a.record["history"][0]["loss"], a.record["history"][-1]["loss"]
    assert last < first  # bright lines on a dark background: the loss must go down in 40 steps
    assert a.record["threshold_source"].startswith("training shots")
    assert a.record["train_dice_at_threshold"] is not None


def test_weight_average_is_the_exponential_average_of_the_last_steps() -> None:
    from dataclasses import replace

    cases = real_cases(1, colour=False)
    base = tiny_config("unet", steps=6)

    def trained(ema_decay: float = 0.0, ema_start_step: int = 0) -> list[torch.Tensor]:
        cfg = replace(base, optim=replace(base.optim, ema_decay=ema_decay, ema_start_step=ema_start_step))
        seg = train_segmenter(cfg, cases, progress=False)
        return [p.detach().clone() for p in seg.network.parameters()]

    last = trained()
    # started after the last step, the average is a copy of the last weights
    assert all(torch.equal(a, b) for a, b in zip(trained(ema_decay=0.9, ema_start_step=5), last, strict=True))
    # started one step earlier: d * w5 + (1 - d) * w6, so its distance from w6 is proportional to d
    gap = {
        d: torch.cat(
            [(a - b).flatten() for a, b in zip(trained(ema_decay=d, ema_start_step=4), last, strict=True)]
        )
        for d in (0.3, 0.9)
    }
    # the last step (lr ~1e-4 near the end of the cosine) moves weights by up to ~1e-4; float32 rounding of
    # the differences is ~1e-7
    assert float(gap[0.9].abs().max()) > 1e-5
    torch.testing.assert_close(gap[0.3] * 3, gap[0.9], rtol=1e-3, atol=1e-6)
    cfg = replace(base, optim=replace(base.optim, ema_decay=0.5))
    assert train_segmenter(cfg, cases, progress=False).record["weights"] == "average (ema_decay 0.5)"
    with pytest.raises(ValueError, match="ema_decay"):
        OptimConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="ema_start_step"):
        OptimConfig(max_steps=5, ema_start_step=5)


def test_synthetic_only_and_streamed_synthetic_pairs() -> None:
    rng = np.random.default_rng(3)

    def stream():  # a one-shot generator, as a shard reader would give
        for _ in range(5):
            yield vessel_pair(rng, 40, 44, colour=True)

    cfg = tiny_config("unet", steps=4, synthetic_pool_size=3, synthetic_refresh_per_step=1)
    seg = train_segmenter(cfg, [], synthetic=stream(), progress=False)
    assert seg.record["batch_real_synthetic"] == [0, 4]
    assert seg.record["num_synthetic_pairs_seen"] == 5  # 3 to fill the pool, then 2 more before it ran dry
    assert seg.record["threshold_source"] == "config" and seg.threshold == 0.5
    # a list larger than the pool is cycled
    pairs = [vessel_pair(rng, 30, 30, colour=False) for _ in range(4)]
    seg = train_segmenter(cfg, real_cases(1), synthetic=pairs, progress=False)
    assert seg.record["num_synthetic_pairs_seen"] == 3 + 4


def test_synthetic_share_follows_its_schedule() -> None:
    patch = PatchConfig(batch_size=4, synthetic_fraction=0.5, synthetic_fraction_end=0.0)
    assert [patch.synthetic_share(s, 5) for s in range(5)] == [0.5, 0.375, 0.25, 0.125, 0.0]
    assert PatchConfig(synthetic_fraction=0.3).synthetic_share(7, 10) == 0.3  # no end: constant
    with pytest.raises(ValueError, match="synthetic_fraction_end"):
        PatchConfig(synthetic_fraction_end=1.5)
    rng = np.random.default_rng(4)
    pairs = [vessel_pair(rng, 30, 30, colour=True) for _ in range(3)]
    # batch 4 over 5 steps: round(4 x share) = 2, 2, 1, 0, 0 synthetic patches (round half to even)
    cfg = tiny_config("unet", steps=5, synthetic_fraction=0.5, synthetic_fraction_end=0.0)
    seg = train_segmenter(cfg, real_cases(1), synthetic=pairs, progress=False)
    assert seg.record["synthetic_patches"] == 5 and seg.record["batch_real_synthetic"] == [2, 2]
    constant = train_segmenter(tiny_config("unet", steps=5), real_cases(1), synthetic=pairs, progress=False)
    assert constant.record["synthetic_patches"] == 10


def test_pseudo_labels_come_from_the_network_midway_and_join_the_batches() -> None:
    from dataclasses import replace

    from finetune.config import PseudoLabelConfig
    from finetune.segmenter import _pseudo_label

    shots = real_cases(2, seed=5, colour=False)
    rng = np.random.default_rng(6)
    images = [vessel_pair(rng, 40, 46, colour=False)[0] for _ in range(3)]
    fov = np.zeros((40, 46), np.uint8)
    fov[5:35, 4:40] = 255
    unlabelled = [(images[0], None), (images[1], fov), (images[2], None)]
    base = tiny_config("unet", steps=6)
    cfg = replace(base, pseudo=PseudoLabelConfig(enabled=True, start_fraction=0.5, batch_fraction=0.5))
    seg = train_segmenter(cfg, shots, progress=False, unlabelled=unlabelled)
    record = seg.record["pseudo_labels"]
    assert record["at_step"] == 3 and record["num_images"] == 3
    assert seg.record["pseudo_patches"] == 3 * 2  # steps 3, 4, 5; half of each batch of 4
    assert record["threshold"] in THRESHOLDS and 0.0 <= record["vessel_fraction"] <= 1.0
    # off, or nothing to label: the same training as plain shots, no pseudo patch
    plain = train_segmenter(base, shots, progress=False, unlabelled=unlabelled)
    assert plain.record["pseudo_labels"] is None and plain.record["pseudo_patches"] == 0
    assert train_segmenter(cfg, shots, progress=False).record["pseudo_patches"] == 0
    # the labels: the network's own masks at the threshold best on the shots, background outside the FOV
    pool = PatchPool()
    done = _pseudo_label(seg.network, cfg, "no", shots, unlabelled, pool, seg.record)
    t, dice = choose_threshold(
        [seg.predict_proba(i) for i, _m, _f in shots], [m for _i, m, _f in shots], [None, None]
    )
    assert done["threshold"] == t and done["shots_dice"] == pytest.approx(dice)
    for k, (image, f) in enumerate(unlabelled):
        expected = seg.predict_proba(image) > t
        if f is not None:
            expected &= f > 0
        np.testing.assert_array_equal(pool._masks_HW[k], expected.astype(np.uint8))
    assert not pool._masks_HW[1][fov == 0].any()
    # never mirrored, even where scoring is (so a model re-scored with mirroring was trained the same way)
    mirrored = replace(cfg, infer=replace(cfg.infer, flip_tta=True))
    assert not np.array_equal(
        Segmenter(seg.network, mirrored).predict_proba(images[0]), seg.predict_proba(images[0])
    )
    again = PatchPool()
    _pseudo_label(seg.network, mirrored, "no", shots, unlabelled, again, seg.record)
    for k in range(3):
        np.testing.assert_array_equal(again._masks_HW[k], pool._masks_HW[k])
    # pseudo.flip_tta: labelled with mirrored averaging, threshold chosen on the mirrored shots
    labeller = Segmenter(seg.network, mirrored)
    flipped = replace(cfg, pseudo=replace(cfg.pseudo, flip_tta=True))
    by_mirror = PatchPool()
    done = _pseudo_label(seg.network, flipped, "no", shots, unlabelled, by_mirror, seg.record)
    t, _ = choose_threshold(
        [labeller.predict_proba(i) for i, _m, _f in shots], [m for _i, m, _f in shots], [None, None]
    )
    assert done["threshold"] == t and done["mirrored"] is True
    for k, (image, f) in enumerate(unlabelled):
        expected = labeller.predict_proba(image) > t
        if f is not None:
            expected &= f > 0
        np.testing.assert_array_equal(by_mirror._masks_HW[k], expected.astype(np.uint8))
    with pytest.raises(ValueError, match="start_fraction"):
        PseudoLabelConfig(start_fraction=1.0)
    with pytest.raises(ValueError, match="batch_fraction"):
        PseudoLabelConfig(batch_fraction=0.0)
    with pytest.raises(ValueError, match="threshold_rule"):
        PseudoLabelConfig(threshold_rule="median")  # type: ignore[arg-type]


def test_area_rule_pseudo_labels_carry_the_shots_vessel_fraction() -> None:
    from dataclasses import replace

    from finetune.config import PseudoLabelConfig
    from finetune.segmenter import _pseudo_label, pooled_dice

    shots = real_cases(2, seed=7, colour=False)
    rng = np.random.default_rng(8)
    fov = np.zeros((40, 46), np.uint8)
    fov[4:36, 3:42] = 255
    unlabelled = [(vessel_pair(rng, 40, 46, colour=False)[0], f) for f in (None, fov, None)]
    cfg = replace(tiny_config("unet", steps=4), pseudo=PseudoLabelConfig(enabled=True, threshold_rule="area"))
    seg = train_segmenter(cfg, shots, progress=False)
    probs = [seg.predict_proba(image) for image, _f in unlabelled]
    masks, fovs = [m for _i, m, _f in shots], [None, None]
    t, fraction = area_threshold(masks, fovs, probs, [f for _i, f in unlabelled])
    best, _ = choose_threshold([seg.predict_proba(i) for i, _m, _f in shots], masks, fovs)
    assert t != best  # the two rules cut these pseudo-labels apart, so the check below tells them apart
    pool = PatchPool()
    done = _pseudo_label(seg.network, cfg, "no", shots, unlabelled, pool, seg.record)
    assert done["threshold"] == t and done["threshold_rule"] == "area"
    shot_probs = [seg.predict_proba(i) for i, _m, _f in shots]
    assert done["shots_dice"] == pytest.approx(pooled_dice(shot_probs, masks, fovs, t))
    for k, ((_image, f), prob) in enumerate(zip(unlabelled, probs, strict=True)):
        expected = prob > t
        if f is not None:
            expected &= f > 0
        np.testing.assert_array_equal(pool._masks_HW[k], expected.astype(np.uint8))
    # labelled where the vessel fraction over the unlabelled images (inside their FOVs) is the shots'
    inside = np.concatenate(
        [p.ravel() if f is None else p[f > 0] for p, (_i, f) in zip(probs, unlabelled, strict=True)]
    )
    assert np.mean(inside > t) == pytest.approx(fraction, abs=2 / inside.size)


def test_pseudo_labels_and_thresholds_see_outputs_cleared_outside_the_estimated_field() -> None:
    """Shots and unlabelled images with a dark, flat outside (an intensifier's): the training decides on
    the shots to use the estimated field, and its pseudo-labels, their area threshold and the threshold
    tuned on the shots are all made from probabilities cleared outside it; undecided, they are not."""
    from dataclasses import replace

    from finetune.config import PseudoLabelConfig
    from finetune.field import decide, estimate_field
    from finetune.segmenter import _pseudo_label

    rng = np.random.default_rng(3)
    shots = [(*collimated_pair(rng, 64), None) for _ in range(2)]
    unlabelled = [(collimated_pair(rng, 64)[0], None) for _ in range(3)]
    cfg = replace(tiny_config("unet", steps=4), pseudo=PseudoLabelConfig(enabled=True, threshold_rule="area"))
    seg = train_segmenter(cfg, shots, progress=False, unlabelled=unlabelled)
    decision = seg.record["field_from_image"]
    assert decision["used"] is True and decision["rule"] == "auto" and seg.field_from_image
    assert seg.record["pseudo_labels"]["field_cleared"] is True
    masks, fovs = [m for _i, m, _f in shots], [None, None]
    assert (seg.threshold, seg.record["train_dice_at_threshold"]) == choose_threshold(
        [seg.predict_output(i) for i, _m, _f in shots], masks, fovs
    )
    fields = [estimate_field(image) for image, _f in unlabelled]
    assert all(0.3 < f.mean() < 0.8 for f in fields)
    never = decide("never", [(i, m) for i, m, _f in shots])
    labels = {}
    for name, choice in (("cleared", decision), ("raw", never)):
        probe = Segmenter(seg.network, cfg, record={"field_from_image": choice})
        probs = [probe.predict_output(image) for image, _f in unlabelled]
        t, _fraction = area_threshold(masks, fovs, probs, [None] * 3)
        pool = PatchPool()
        done = _pseudo_label(seg.network, cfg, "no", shots, unlabelled, pool, {"field_from_image": choice})
        assert done["threshold"] == t and done["field_cleared"] is choice["used"]
        for k, prob in enumerate(probs):
            np.testing.assert_array_equal(pool._masks_HW[k], (prob > t).astype(np.uint8))
        labels[name] = pool._masks_HW
    assert not any(m[~f].any() for m, f in zip(labels["cleared"], fields, strict=True))
    # the check above can fail: uncleared, this network labels some of the outside as vessel
    assert any(m[~f].any() for m, f in zip(labels["raw"], fields, strict=True))


def test_pooled_dice_on_hand_made_masks() -> None:
    from finetune.segmenter import pooled_dice

    prob = np.array([[0.9, 0.2], [0.6, 0.1]], np.float32)
    label = np.array([[1, 1], [0, 0]], np.uint8)
    # t=0.5: predicted {(0,0), (1,0)}, label {(0,0), (0,1)}: tp 1, 2 * 1 / (2 + 2)
    assert pooled_dice([prob], [label], [None], 0.5) == pytest.approx(0.5)
    # pooled over two cases, the second with a FOV that hides its only false positive
    fov = np.array([[255, 255], [0, 255]], np.uint8)
    assert pooled_dice([prob, prob], [label, label], [None, fov], 0.5) == pytest.approx(2 * 2 / (3 + 4))


def test_flip_tta_averages_the_mirrored_predictions() -> None:
    from dataclasses import replace

    image, _mask, _ = real_cases(1)[0]
    cfg = tiny_config("unet", steps=3)
    plain = train_segmenter(cfg, real_cases(1), progress=False)
    mirrored = Segmenter(plain.network, replace(cfg, infer=replace(cfg.infer, flip_tta=True)))
    expected = np.mean(
        [
            plain.predict_proba(image),
            plain.predict_proba(image[:, ::-1].copy())[:, ::-1],
            plain.predict_proba(image[::-1].copy())[::-1],
            plain.predict_proba(image[::-1, ::-1].copy())[::-1, ::-1],
        ],
        axis=0,
    )
    got = mirrored.predict_proba(image)
    assert got.shape == image.shape[:2]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, plain.predict_proba(image), atol=1e-4)  # the network is not mirror-symmetric


def test_rot90_tta_averages_all_eight_symmetries_of_the_square() -> None:
    from dataclasses import replace

    image, _mask, _ = real_cases(1)[0]
    image = image[:, :-7].copy()  # not square: the turned views have the sides swapped
    cfg = tiny_config("unet", steps=3)
    plain = train_segmenter(cfg, real_cases(1), progress=False)
    views = replace(cfg.infer, flip_tta=True, rot90_tta=True)
    dihedral = Segmenter(plain.network, replace(cfg, infer=views))
    turned_only = Segmenter(plain.network, replace(cfg, infer=replace(views, flip_tta=False)))
    mirrored = Segmenter(plain.network, replace(cfg, infer=replace(views, rot90_tta=False)))
    expected = []
    for turn in (0, 1):
        for flip_rows, flip_cols in ((False, False), (False, True), (True, False), (True, True)):
            view = np.rot90(image, turn)
            view = view[::-1] if flip_rows else view
            view = view[:, ::-1] if flip_cols else view
            prob = plain.predict_proba(np.ascontiguousarray(view))
            prob = prob[:, ::-1] if flip_cols else prob
            prob = prob[::-1] if flip_rows else prob
            expected.append(np.rot90(prob, -turn))
    got = dihedral.predict_proba(image)
    assert got.shape == image.shape[:2]
    np.testing.assert_allclose(got, np.mean(expected, axis=0), atol=1e-5)
    np.testing.assert_allclose(turned_only.predict_proba(image), np.mean(expected[::4], axis=0), atol=1e-5)
    assert not np.allclose(got, mirrored.predict_proba(image), atol=1e-4)  # the turned views add something


def test_choose_threshold_by_hand() -> None:
    # label 1 on the left pixels; probabilities 0.3 and 0.7 on vessel, 0.2 and 0.6 on background
    prob = np.array([[0.3, 0.2], [0.7, 0.6]])
    label = np.array([[1, 0], [1, 0]])
    # t < 0.2: all positive, Dice 2*2/(4+2)=0.67; 0.2..0.3: Dice 2*2/(3+2)=0.8; 0.3..0.6: 2*1/(2+2)=0.5;
    # 0.6..0.7: 2*1/(1+2)=0.67; above 0.7: 0 (a pixel is vessel when p > t). Best: 0.2 <= t < 0.3, so
    # candidates 0.2 and 0.25, and 0.25 is nearer 0.5
    t, dice = choose_threshold([prob], [label], [None])
    assert t == pytest.approx(0.25) and dice == pytest.approx(0.8)
    fov = np.array([[0, 1], [1, 1]])  # hides the 0.3 vessel pixel: 0.6 <= t < 0.7 is now perfect
    t, dice = choose_threshold([prob], [label], [fov])
    assert t == pytest.approx(0.6) and dice == pytest.approx(1.0)


def test_area_threshold_by_hand() -> None:
    shot = np.array([[255, 0], [0, 0]], np.uint8)  # a quarter of the shot is vessel
    a = np.array([[0.1, 0.9], [0.4, 0.6]])
    b = np.array([[0.2, 0.3], [0.8, 0.7]])
    # 8 unlabelled pixels, a quarter of them = 2 above the threshold: midway between 0.8 and 0.7
    t, fraction = area_threshold([shot], [None], [a, b], [None, None])
    assert fraction == pytest.approx(0.25) and t == pytest.approx(0.75)
    assert int((a > t).sum() + (b > t).sum()) == 2
    # FOVs on both sides: the shot's hides a background pixel (1/3 vessel), the image's hides 0.4, so one of
    # the 3 pixels inside (0.1, 0.9, 0.6) is vessel: midway between 0.9 and 0.6
    t, fraction = area_threshold([shot], [np.array([[1, 0], [1, 1]])], [a], [np.array([[1, 1], [0, 1]])])
    assert fraction == pytest.approx(1 / 3) and t == pytest.approx(0.75)
    # more vessel in the shots than any threshold can give, and none at all: the ends of the candidates
    t, _ = area_threshold([np.full((2, 2), 255, np.uint8)], [None], [a], [None])
    assert t == pytest.approx(0.05)
    t, _ = area_threshold([np.zeros((2, 2), np.uint8)], [None], [a], [None])
    assert t == pytest.approx(0.95)
    with pytest.raises(ValueError, match="unlabelled"):
        area_threshold([shot], [None], [], [])


def test_bad_input_is_reported() -> None:
    image, mask, _ = real_cases(1)[0]
    cfg = tiny_config()
    with pytest.raises(ValueError, match="does not match image"):
        train_segmenter(cfg, [(image, mask[:-1], None)], progress=False)
    with pytest.raises(ValueError, match="no training data"):
        train_segmenter(cfg, [], progress=False)
    with pytest.raises(ValueError, match="same height and width"):
        train_segmenter(cfg, [], synthetic=[(image, mask[:, :-1])], progress=False)
    with pytest.raises(ValueError, match="multiple of 4"):
        SegmenterConfig(net=NetConfig(num_levels=3), patch=PatchConfig(patch_size_px=30))
    with pytest.raises(ValueError, match="multiple of 12"):
        NetConfig(arch="swin_unetr", base_channels=16)
    with pytest.raises(ValueError, match=">= 64 for swin_unetr"):
        SegmenterConfig(
            net=NetConfig(arch="swin_unetr", base_channels=12), patch=PatchConfig(patch_size_px=32)
        )
    with pytest.raises(ValueError, match="max_side_px"):
        InputConfig(max_side_px=-1)


def test_load_refuses_what_is_not_a_segmenter(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        Segmenter.load(tmp_path)
    seg = Segmenter(build_network(NetConfig(base_channels=8, num_levels=3)), tiny_config())
    seg.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["format"] = "something-else"
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a univg segmenter"):
        Segmenter.load(tmp_path / "m")
    meta["format"] = "univg-segmenter/1"
    meta["segmenter"]["net"]["base_channels"] = 16  # weights no longer fit
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not fit"):
        Segmenter.load(tmp_path / "m")

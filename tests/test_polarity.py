"""finetune.polarity: a task's images go into a pretrained start as they are or inverted, decided on the
shots by how the start reads them; an inverted image's input is the negative of the image's own, and the
rehearsed corpus pairs keep the start's polarity."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from data_engine.corpus import make_sample, modality_of
from finetune.config import load_finetune_config
from finetune.polarity import MARGIN, decide
from finetune.sampler import PatchPool
from finetune.segmenter import CorpusPair, Segmenter, _SyntheticFeed, network_input, train_segmenter
from shards.config import load_corpus_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights" / "segmenter-univg58k-cpu-fast"


def test_an_inverted_image_goes_in_as_the_negated_input() -> None:
    rng = np.random.default_rng(0)
    for shape in ((40, 56), (40, 56, 3)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        as_is = network_input(image, 0)
        np.testing.assert_allclose(network_input(255 - image, 0), -as_is, atol=1e-5)
        np.testing.assert_array_equal(network_input(image, 0, inverted=True), -as_is)


def test_forced_rules_and_a_task_without_a_start_need_no_reading() -> None:
    shot = (np.zeros((8, 8), np.uint8), np.full((8, 8), 255, np.uint8), None)
    assert decide("as_is", [shot], None)["inverted"] is False
    assert decide("inverted", [shot], None)["inverted"] is True
    startless = decide("auto", [shot], None)
    assert startless["inverted"] is False and "no pretrained start" in startless["why"]
    assert startless["dice_as_is"] is None
    with pytest.raises(ValueError, match="input.polarity: 'upside_down' is not one of auto, as_is, inverted"):
        decide("upside_down", [shot], None)


def test_auto_inverts_only_where_the_start_reads_the_shots_better_inverted_by_the_margin() -> None:
    """A reader that sees dark pixels as vessel: dark vessels are read as they are, bright ones inverted."""
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 14:18] = 255
    dark = np.where(mask > 0, 40, 200).astype(np.uint8)

    def reads_dark(image: np.ndarray, inverted: bool) -> np.ndarray:
        grey = (255 - image if inverted else image).astype(np.float32)
        return 1.0 - grey / 255.0

    kept = decide("auto", [(dark, mask, None)], reads_dark)
    assert kept["inverted"] is False and kept["dice_as_is"] == 1.0 and kept["dice_inverted"] < 0.5
    turned = decide("auto", [(255 - dark, mask, None)], reads_dark)
    assert turned["inverted"] is True and turned["dice_inverted"] == 1.0
    # a reader that reads both ways alike leaves the images as they are
    assert (
        decide("auto", [(dark, mask, None)], lambda image, _inverted: reads_dark(image, False))["inverted"]
        is False
    )


def test_a_segmenter_that_inverts_reads_an_image_as_its_inverse_is_read() -> None:
    seg = Segmenter.load(SHIPPED)
    seg.cfg = replace(seg.cfg, infer=replace(seg.cfg.infer, flip_tta=False))
    image = make_sample(load_corpus_config(ROOT / "configs" / "corpus" / "tiny.yaml").engine, 0).image
    plain = seg.predict_proba(255 - image)
    seg.record["input_polarity"] = {"inverted": True}
    assert seg.inverted
    np.testing.assert_allclose(seg.predict_proba(image), plain, atol=1e-4)


def test_rehearsed_corpus_pairs_keep_the_start_polarity_where_the_task_pairs_are_inverted() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    mask = np.zeros((24, 24), np.uint8)
    mask[10:14] = 255
    pool = PatchPool()
    _SyntheticFeed([(image, mask), CorpusPair(image, mask)], pool, 0, inverted=True).pull(2)
    as_is = network_input(image, 0).transpose(1, 2, 0)
    task_input, corpus_input = pool._images_HWC
    np.testing.assert_array_equal(task_input, -as_is)
    np.testing.assert_array_equal(corpus_input, as_is)


def test_training_from_the_shipped_start_inverts_shots_it_reads_better_inverted() -> None:
    """Engine fundus images (dark vessels), which the shipped start reads at Dice > 0.9 as they are and far
    worse inverted: as shots they go in as they are; shown inverted, the training turns them back."""
    engine = load_corpus_config(ROOT / "configs" / "corpus" / "univg58k.yaml").engine
    indices = [i for i in range(58_689, 58_689 + 12) if modality_of(engine, i) == "fundus"][:2]
    samples = [make_sample(engine, i) for i in indices]
    cfg = load_finetune_config(ROOT / "configs" / "finetune" / "cpu-fast.yaml").segmenter
    cfg = replace(
        cfg,
        optim=replace(cfg.optim, max_steps=1, warmup_steps=1),
        patch=replace(cfg.patch, batch_size=2),
        pseudo=replace(cfg.pseudo, enabled=False),
        infer=replace(cfg.infer, flip_tta=False),
    )
    as_shown = [(s.image, s.mask, s.fov) for s in samples]
    kept = train_segmenter(cfg, as_shown, progress=False, init_from=SHIPPED)
    record = kept.record["input_polarity"]
    assert not kept.inverted and record["rule"] == "auto"
    assert record["dice_as_is"] > 0.85 and record["dice_as_is"] > record["dice_inverted"] + MARGIN
    shown_inverted = [(255 - s.image, s.mask, s.fov) for s in samples]
    turned = train_segmenter(cfg, shown_inverted, progress=False, init_from=SHIPPED)
    assert turned.inverted
    assert turned.record["input_polarity"]["dice_inverted"] == pytest.approx(record["dice_as_is"], abs=0.01)
    # forced, or from random weights: no reading, as they are unless told
    forced = replace(cfg, input=replace(cfg.input, polarity="as_is"))
    assert not train_segmenter(forced, shown_inverted, progress=False, init_from=SHIPPED).inverted
    assert not train_segmenter(cfg, shown_inverted, progress=False).inverted

"""The segmenter start the cpu-fast profile ships with (weights/segmenter-univg58k-cpu-fast): found from any
working folder, the profile's own network, a trained segmenter of the corpus it names for rehearsal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_engine.corpus import make_sample, modality_of
from finetune.config import load_finetune_config
from finetune.run import check_rehearsal, checkout_path, with_checkout_paths
from finetune.segmenter import Segmenter, build_network, load_initial_weights
from shards.config import load_corpus_config

ROOT = Path(__file__).resolve().parents[1]
CPU_FAST = ROOT / "configs" / "finetune" / "cpu-fast.yaml"
SHIPPED = ROOT / "weights" / "segmenter-univg58k-cpu-fast"


def test_the_profile_finds_its_start_and_rehearsal_corpus_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_finetune_config(CPU_FAST)
    monkeypatch.chdir(tmp_path)
    found = with_checkout_paths(cfg)
    assert Path(found.pretrained_segmenter) == SHIPPED
    assert Path(found.rehearsal.corpus) == ROOT / "configs" / "corpus" / "univg58k.yaml"
    check_rehearsal(found)
    load_initial_weights(Path(found.pretrained_segmenter), found.segmenter)  # the profile's own network
    # a path that exists from the working folder is that one; empty (from scratch) and unknown stay as given
    (tmp_path / "weights" / "segmenter-univg58k-cpu-fast").mkdir(parents=True)
    own = checkout_path("weights/segmenter-univg58k-cpu-fast")
    assert own == str(tmp_path / "weights" / "segmenter-univg58k-cpu-fast")
    assert checkout_path("") == "" and checkout_path("no/such/start") == "no/such/start"
    scratch = with_checkout_paths(
        load_finetune_config(CPU_FAST, ["pretrained_segmenter=", "rehearsal.corpus="])
    )
    assert scratch.pretrained_segmenter == "" and scratch.rehearsal.corpus == ""


def test_the_shipped_start_segments_the_corpus_it_learned_from() -> None:
    """Zero-shot on one new engine pair of each modality (indices past the 58,689 it trained on): a
    trained segmenter, far from the same network untrained."""
    seg = Segmenter.load(SHIPPED)
    engine = load_corpus_config(ROOT / "configs" / "corpus" / "univg58k.yaml").engine
    first: dict[str, int] = {}  # the first index of each modality past the corpus
    for i in range(58_689, 58_689 + 50):
        first.setdefault(modality_of(engine, i), i)
    samples = [make_sample(engine, i) for i in first.values()]
    assert len(samples) == 5

    def mean_dice(segmenter: Segmenter) -> float:
        dice = []
        for s in samples:
            label, pred = s.mask > 0, segmenter.predict(s.image) > 0
            dice.append(
                2 * np.count_nonzero(label & pred) / (np.count_nonzero(label) + np.count_nonzero(pred))
            )
        return float(np.mean(dice))

    trained = mean_dice(seg)
    torch.manual_seed(0)
    seg.network = build_network(seg.cfg.net).eval()
    assert trained > 0.6 and trained > mean_dice(seg) + 0.3

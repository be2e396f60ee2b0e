"""`univg segmenter-pretrain` and starting few-shot runs from its weights: a real tiny corpus built by the
data engine, a few real training steps, the weights carried into univg (and not into the baselines)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from finetune_testdata import write_task

from finetune.config import load_finetune_config
from finetune.pretrain_segmenter import corpus_pairs, pretrain_segmenter
from finetune.run import rehearsal_pairs, run_finetune, thin_mask, with_rehearsal
from finetune.segmenter import Segmenter, build_network, train_segmenter
from shards.build import build_corpus
from shards.config import load_corpus_config
from shards.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "finetune" / "tiny.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    cfg = load_corpus_config(
        ROOT / "configs" / "corpus" / "tiny.yaml", ["num_samples=30", "samples_per_shard=10"]
    )
    build_corpus(cfg, out, num_workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def pretrained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "seg"
    pretrain_segmenter(corpus, out, load_finetune_config(TINY), progress=False)
    return out / "model"


def test_corpus_pairs_shuffle_shards_repeat_and_filter(corpus: Path) -> None:
    pairs = corpus_pairs(corpus, seed=0)
    first = [next(pairs) for _ in range(45)]  # 30 samples: the stream starts over in a new shard order
    assert all(img.shape[:2] == mask.shape == (64, 64) for img, mask in first)
    again = [next(corpus_pairs(corpus, seed=0)) for _ in range(1)]
    assert np.array_equal(again[0][0], first[0][0])  # seeded
    xca = corpus_pairs(corpus, seed=0, modalities={"xca"})
    assert all(next(xca)[0].ndim == 2 for _ in range(8))  # xca is grey; fundus would be colour
    with pytest.raises(ValueError, match="no samples of modality"):
        next(corpus_pairs(corpus, seed=0, modalities={"ultrasound"}))


def test_a_corpus_config_streams_the_pairs_its_built_shards_hold(corpus: Path, tmp_path: Path) -> None:
    """The config a corpus was built from, given instead of the folder, streams the same arrays in the same
    order (made by the engine on the fly), filtered by modality alike; a bad config is refused by name."""
    config = tmp_path / "corpus.yaml"
    config.write_text(yaml.safe_dump(load_manifest(corpus).config, sort_keys=False))
    for seed, modalities in ((0, None), (1003, None), (0, {"xca", "mra"})):
        from_shards, from_engine = (
            corpus_pairs(corpus, seed, modalities),
            corpus_pairs(config, seed, modalities),
        )
        for _ in range(40):  # 30 samples: past the end of the first pass into the second shard order
            (image, mask), (image_e, mask_e) = next(from_shards), next(from_engine)
            assert image.dtype == image_e.dtype and np.array_equal(image, image_e)
            assert np.array_equal(mask, mask_e)
    with pytest.raises(ValueError, match=r"corpus.yaml: no samples of modality \['ultrasound'\]"):
        next(corpus_pairs(config, seed=0, modalities={"ultrasound"}))
    one_modality = tmp_path / "octa_only.yaml"
    data = yaml.safe_load(config.read_text())
    data["engine"]["modalities"] = {"octa": 1.0, "xca": 0.0}
    one_modality.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"no samples of modality \['xca'\]; it holds \['octa'\]"):
        corpus_pairs(one_modality, seed=0, modalities={"xca"})
    # so `univg segmenter-pretrain --shards CONFIG.yaml` trains the same weights as on the built corpus
    cfg = load_finetune_config(TINY, ["segmenter.optim.max_steps=3"])
    models = [
        pretrain_segmenter(src, tmp_path / f"pre_{k}", cfg, progress=False)
        for k, src in enumerate((corpus, config))
    ]
    weights = [Segmenter.load(m).network.state_dict() for m in models]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_pretrained_weights_are_where_training_starts(pretrained: Path) -> None:
    seg = Segmenter.load(pretrained)
    assert seg.record["pretrained_on"] and seg.record["batch_real_synthetic"] == [0, 4]
    with pytest.raises(FileExistsError, match="exists"):
        pretrain_segmenter(seg.record["pretrained_on"], pretrained.parent, load_finetune_config(TINY))
    cfg = load_finetune_config(TINY, ["segmenter.optim.lr=1e-12", "segmenter.optim.max_steps=1"]).segmenter
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 48), dtype=np.uint8)
    mask = np.zeros((48, 48), np.uint8)
    mask[20:24] = 255
    started = train_segmenter(cfg, [(image, mask, None)], progress=False, init_from=pretrained)
    torch.manual_seed(cfg.seed)
    scratch = build_network(cfg.net)
    pairs = list(zip(started.network.parameters(), seg.network.parameters(), strict=True))
    assert all(torch.allclose(a.detach(), b.detach(), atol=1e-6) for a, b in pairs)
    fresh = zip(seg.network.parameters(), scratch.parameters(), strict=True)
    assert any(not torch.allclose(b.detach(), c.detach()) for b, c in fresh)
    other = load_finetune_config(TINY, ["segmenter.net.base_channels=12"]).segmenter
    with pytest.raises(ValueError, match="is not this run's"):
        train_segmenter(other, [(image, mask, None)], progress=False, init_from=pretrained)


def test_anchor_decay_pulls_training_toward_the_pretrained_start(pretrained: Path) -> None:
    start = Segmenter.load(pretrained)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (48, 48), dtype=np.uint8)
    mask = np.zeros((48, 48), np.uint8)
    mask[:, 10:14] = 255
    base = ["segmenter.optim.max_steps=5", "segmenter.optim.warmup_steps=0", "segmenter.optim.lr=0.01"]

    def distance(anchor_decay: float, init: Path | None = pretrained) -> float:
        over = [*base, f"segmenter.optim.anchor_decay={anchor_decay}"]
        cfg = load_finetune_config(TINY, over).segmenter
        trained = train_segmenter(cfg, [(image, mask, None)], progress=False, init_from=init)
        pairs = zip(trained.network.parameters(), start.network.parameters(), strict=True)
        return float(sum(((a.detach() - b.detach()) ** 2).sum() for a, b in pairs))

    free, pulled, pinned = distance(0.0), distance(20.0), distance(1e6)
    assert free > pulled > 0  # 0.2 of the way back at the first step, less as the rate decays
    assert pinned < 1e-12 * free  # lr * anchor_decay >= 1: back at the start after every step
    # without a pretrained start there is nothing to pull toward: the same as plain training
    assert distance(1e6, init=None) == distance(0.0, init=None)
    with pytest.raises(ValueError, match="anchor_decay"):
        load_finetune_config(TINY, ["segmenter.optim.anchor_decay=-1"])


def test_finetune_starts_univg_from_it_and_the_baselines_from_scratch(
    pretrained: Path, tmp_path: Path
) -> None:
    task = write_task(tmp_path / "task", ["train"] * 3 + ["test"] * 2, size=(56, 64), colour=True)
    cfg = load_finetune_config(
        TINY, [f"pretrained_segmenter={pretrained}", "split.num_draws=1", "methods=[univg,baseline]"]
    )
    run_finetune(task, tmp_path / "run", cfg, progress=False)
    draw = tmp_path / "run" / "draw_0"
    univg = json.loads((draw / "univg" / "eval" / "summary.json").read_text())
    baseline = json.loads((draw / "baseline" / "eval" / "summary.json").read_text())
    assert univg["initial_weights"] == str(pretrained.resolve()) and baseline["initial_weights"] is None
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    start = summary["segmenter"]["pretrained_start"]
    assert start["methods"] == ["univg"] and start["weights"] == str(pretrained.resolve())
    assert start["peak_lr"] == cfg.segmenter.optim.lr  # tiny sets no rate of its own
    assert (
        f"univg starts from the pretrained segmenter `{pretrained.resolve()}`"
        in (tmp_path / "run" / "report.md").read_text()
    )
    # a missing folder stops the run before it writes anything
    bad = load_finetune_config(TINY, [f"pretrained_segmenter={tmp_path / 'nothing'}"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_finetune(task, tmp_path / "run2", bad, progress=False)
    assert not (tmp_path / "run2").exists()


def test_cli(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "seg"
    cmd = [
        sys.executable,
        "-m",
        "univg.cli",
        "segmenter-pretrain",
        "--shards",
        str(corpus),
        "--out",
        str(out),
    ]
    done = subprocess.run(
        [*cmd, "--profile", "tiny", "--steps", "2", "--modalities", "octa,mra", "--no-progress"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "model" / "config.json").is_file() and (out / "pretrain.log").read_text()
    assert json.loads((out / "model" / "config.json").read_text())["record"]["history"][-1]["step"] == 2
    again = subprocess.run([*cmd, "--steps", "2"], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "exists" in again.stderr
    # a corpus that is not one, or lacks the asked modality: a clear error and no folder written
    for shards, more, message in (
        (tmp_path / "nothing", [], "manifest"),
        (ROOT / "configs" / "corpus" / "demo.yaml", ["--modalities", "fundus"], "no samples of modality"),
    ):
        bad_out = tmp_path / "bad"
        bad = [sys.executable, "-m", "univg.cli", "segmenter-pretrain", "--shards", str(shards)]
        failed = subprocess.run(
            [*bad, "--out", str(bad_out), "--profile", "tiny", *more],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert failed.returncode != 0 and message in failed.stderr, failed.stderr
        assert not bad_out.exists()


def test_rehearsal_mixes_corpus_pairs_into_the_synthetic_stream(corpus: Path) -> None:
    own = [(np.full((64, 64, 3), 200 + k, np.uint8), np.eye(64, dtype=np.uint8) * 255) for k in range(12)]
    cfg = load_finetune_config(TINY, [f"rehearsal.corpus={corpus}", "rehearsal.share=0.25"])
    stream = with_rehearsal(cfg, own, draw=0)
    first, second = list(stream), list(stream)
    assert len(first) == len(second) == 16  # 12 own pairs and a quarter of 16 from the corpus
    mine = [p for p in first if p[0].ndim == 3 and p[0].shape == (64, 64, 3) and p[0].min() >= 200]
    assert [int(p[0][0, 0, 0]) for p in mine] == list(range(200, 212))  # in their order
    reference = corpus_pairs(corpus, seed=cfg.rehearsal.seed)  # draw 0: the rehearsal seed itself
    expected = [next(reference) for _ in range(8)]
    mixed = [first[i] for i in (3, 7, 11, 15)] + [second[i] for i in (3, 7, 11, 15)]  # spread evenly
    for (image, mask), (want_image, want_mask) in zip(mixed, expected, strict=True):
        assert np.array_equal(image, want_image) and np.array_equal(mask, want_mask)  # and new each pass
    other_draw = list(with_rehearsal(cfg, own, draw=1))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other_draw, strict=True))
    assert with_rehearsal(load_finetune_config(TINY), own, draw=0) is own  # off unless a corpus is named


def test_thinned_rehearsal_masks_lose_their_rim_and_keep_every_vessel(corpus: Path) -> None:
    mask = np.zeros((40, 40), np.uint8)
    mask[10:17, 5:35] = 255  # a vessel 7 px wide
    mask[25, 5:35] = 255  # and one 1 px wide
    thin = thin_mask(mask, 1.0)
    assert set(np.unique(thin)) <= {0, 255}
    # the 7-px vessel loses its outer row on each side (and its ends); the 1-px one stays as it is
    assert np.array_equal(np.nonzero(thin[:20, 20])[0], np.arange(11, 16))
    assert np.array_equal(thin[25], mask[25]) and not (thin & ~mask).any()
    assert np.count_nonzero(thin_mask(mask, 2.0)[:20, 20]) == 3
    plain = load_finetune_config(TINY, [f"rehearsal.corpus={corpus}"])
    thinned = load_finetune_config(TINY, [f"rehearsal.corpus={corpus}", "rehearsal.thin_px=1"])
    for (image, m), (image_t, m_t) in zip(
        (next(p) for p in [rehearsal_pairs(plain, 0)] * 4),
        (next(p) for p in [rehearsal_pairs(thinned, 0)] * 4),
        strict=True,
    ):
        assert np.array_equal(image, image_t)  # the same corpus pairs, in the same order
        assert np.array_equal(m_t, thin_mask(m, 1.0)) and np.count_nonzero(m_t) < np.count_nonzero(m)
    with pytest.raises(ValueError, match="rehearsal.thin_px"):
        load_finetune_config(TINY, ["rehearsal.thin_px=-1"])


def test_rehearsal_in_a_run_and_its_bad_input(corpus: Path, pretrained: Path, tmp_path: Path) -> None:
    task = write_task(tmp_path / "task", ["train"] * 3 + ["test"] * 2, size=(56, 64), colour=True)
    base = [f"pretrained_segmenter={pretrained}", "split.num_draws=1", "methods=[univg]"]
    cfg = load_finetune_config(TINY, [*base, f"rehearsal.corpus={corpus}", "rehearsal.modalities=[fundus]"])
    summary = run_finetune(task, tmp_path / "run", cfg, progress=False)
    assert summary["methods"]["univg"]["num_draws"] == 1
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["rehearsal"]["corpus"] == str(corpus) and saved["rehearsal"]["modalities"] == ["fundus"]
    log = (tmp_path / "run" / "finetune.log").read_text()
    assert "draw 0: univg rehearses 25% corpus pairs (fundus)" in log
    assert summary["segmenter"]["rehearsal"] == {
        "corpus": str(corpus),
        "share": 0.25,
        "modalities": ["fundus"],
    }
    assert (
        f"25% of the synthetic pairs are pairs of the corpus `{corpus}` (fundus;"
        in (tmp_path / "run" / "report.md").read_text()
    )
    run_finetune(task, tmp_path / "run", cfg, resume=True, progress=False)  # finished: trains nothing
    log = (tmp_path / "run" / "finetune.log").read_text()
    assert "done already" in log and log.count("univg rehearses") == 1  # and says no rehearsal either
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: x\nnum_samplez: 10\n")
    for bad, message in (
        (f"rehearsal.corpus={tmp_path / 'nothing'}", "not a shard corpus"),
        (f"rehearsal.corpus={typo}", "typo.yaml: not a corpus config .*num_samplez"),
        (f"rehearsal.corpus={tmp_path / 'none.yaml'}", "none.yaml: not a corpus config"),
        ("rehearsal.modalities=[ultrasound]", r"holds no \['ultrasound'\]"),
    ):
        wrong = load_finetune_config(TINY, [*base, f"rehearsal.corpus={corpus}", bad])
        with pytest.raises(ValueError, match=message):
            run_finetune(task, tmp_path / "run2", wrong, progress=False)
        assert not (tmp_path / "run2").exists()  # stopped before writing anything
    with pytest.raises(ValueError, match="rehearsal.share"):
        load_finetune_config(TINY, ["rehearsal.share=1.0"])


def test_pretrained_lr_is_the_peak_rate_from_a_pretrained_start_only(pretrained: Path) -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (48, 48), dtype=np.uint8)
    mask = np.zeros((48, 48), np.uint8)
    mask[14:18] = 255
    base = ["segmenter.optim.max_steps=4", "segmenter.optim.warmup_steps=0"]

    def weights(over: list[str], init: Path | None) -> tuple[list[torch.Tensor], float]:
        cfg = load_finetune_config(TINY, [*base, *over]).segmenter
        seg = train_segmenter(cfg, [(image, mask, None)], progress=False, init_from=init)
        return [p.detach().clone() for p in seg.network.parameters()], seg.record["peak_lr"]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    own, own_lr = weights(["segmenter.optim.lr=1e-3", "segmenter.optim.pretrained_lr=5e-3"], pretrained)
    plain, plain_lr = weights(["segmenter.optim.lr=5e-3"], pretrained)
    slow, _ = weights(["segmenter.optim.lr=1e-3"], pretrained)
    assert own_lr == plain_lr == 5e-3 and same(own, plain) and not same(own, slow)
    # from scratch the rate of its own is not used: the same weights as plain lr
    scratch, scratch_lr = weights(["segmenter.optim.lr=1e-3", "segmenter.optim.pretrained_lr=5e-3"], None)
    assert scratch_lr == 1e-3 and same(scratch, weights(["segmenter.optim.lr=1e-3"], None)[0])
    with pytest.raises(ValueError, match="pretrained_lr"):
        load_finetune_config(TINY, ["segmenter.optim.pretrained_lr=-1"])


def test_a_checkout_corpus_config_rehearses_and_resumes_from_any_folder(
    pretrained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rehearsal.corpus=configs/corpus/tiny.yaml (the checkout's, as the cpu-fast profile names its own):
    found from another working folder, saved as an absolute path, so the run resumes from the checkout too."""
    task = write_task(tmp_path / "task", ["train"] * 3 + ["test"] * 2, size=(56, 64), colour=True)
    over = [f"pretrained_segmenter={pretrained}", "split.num_draws=1", "methods=[univg]"]
    cfg = load_finetune_config(TINY, [*over, "rehearsal.corpus=configs/corpus/tiny.yaml"])
    monkeypatch.chdir(tmp_path)
    run_finetune(task, tmp_path / "run", cfg, progress=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["rehearsal"]["corpus"] == str(ROOT / "configs" / "corpus" / "tiny.yaml")
    assert "rehearses 25% corpus pairs (every modality)" in (tmp_path / "run" / "finetune.log").read_text()
    monkeypatch.chdir(ROOT)
    summary = run_finetune(task, tmp_path / "run", cfg, resume=True, progress=False)
    assert summary["segmenter"]["rehearsal"]["corpus"] == saved["rehearsal"]["corpus"]

"""`univg finetune`: few-shot vessel segmentation for a new task, end to end.

    univg finetune --task my_task/pairs.csv --shots 5 --out runs/my_task [--profile cpu-fast|gpu]
    univg finetune --task my_task/pairs.csv --cases a,b,c --out runs/my_task --methods univg
    univg finetune ... --resume auto          # continue an interrupted run: finished stages are kept
    univg finetune --task set_a/pairs.csv --eval-task set_b/pairs.csv ...   # shots of A, scored on B
    univg finetune ... --unlabelled set_b/pairs.csv   # self-training on B's non-test images, labels unread
    univg finetune ... --eval-task set_b/pairs.csv --eval-scale 0.5   # B at twice A's resolution

For each of `split.num_draws` draws of the shots (draw d: seed + d): split -> synthesis from the shots
(data engine, CPU; shards + preview) -> segmenter on shots + synthetic pairs (`univg`) and on the shots
alone (`baseline`) -> evaluation on the task's test split (or on another task's, `--eval-task`: shots
from one set tested on another; everything labelled comes from the first task; `--unlabelled` points
self-training at other images, without their labels, such as the second set's train split; `--eval-scale`
resizes the scored images for the network when their pixel size differs from the shots'). Full
supervision (`full`: every label of the pool) is trained once. Every method uses the same segmenter
config and step budget. Then `summary.json` (per method: per draw and mean/std over draws; per case in
each evaluation folder), `report.md` and `comparison.png` (a few test cases: image | label | each
method's errors).

Run folder:
    config.yaml  finetune.log  summary.json  report.md  comparison.png
    model/                      the univg segmenter of draw 0 (what `univg segment --model RUN` loads)
    full/{model,eval}/          full supervision
    draw_<d>/split.json         the drawn shots and the scored cases
    draw_<d>/synthetic/         shards + manifest.json + preview.png
    draw_<d>/<method>/{model,eval}/
A stage is done when its last file exists (model/config.json, eval/summary.json, synthetic/manifest.json),
so `--resume auto` redoes only an interrupted stage (a segmenter training restarts from its first step).
All input is read and checked before anything is written; an existing run is never replaced without
`--overwrite`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import yaml

from data_engine.ingest import Case, Task, load_case, read_task, unlabelled_images
from finetune.config import FinetuneConfig, load_finetune_config
from finetune.field import decide as decide_field
from finetune.metrics import METRICS
from finetune.sampler import check_scale
from finetune.split import Split, draw_split, score_on, spread, unlabelled_cases, write_split
from univg.config import add_config_options, cli_overrides, to_dict

if TYPE_CHECKING:
    from finetune.segmenter import Segmenter

log = logging.getLogger("univg.finetune")

ROOT = Path(__file__).resolve().parents[1]
PROFILES_DIR = ROOT / "configs" / "finetune"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
PRED_DIR = "pred"  # <method>/eval/pred/<case>.png: the thresholded masks that were scored
LoadedCase = tuple[np.ndarray, np.ndarray, np.ndarray | None]
UnlabelledImage = tuple[np.ndarray, np.ndarray | None]  # (image, FOV or None): no label


# --- input ---


def profile_path(profile: str) -> Path:
    """configs/finetune/<profile>.yaml; an unknown profile lists the known ones."""
    path = PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ValueError(f"--profile {profile!r} is not one of {known} (files in {PROFILES_DIR})")
    return path


def plan_splits(
    task: Task,
    task_path: str | Path,
    cfg: FinetuneConfig,
    cases: list[str] | None,
    scored_on: tuple[Task, str | Path] | None = None,
) -> list[Split]:
    """The run's draws: named cases (one draw), or split.num_draws draws of split.shots; scored on the task
    `scored_on` (and its path) instead of their own, when given (`score_on`)."""
    if cases is not None:
        splits = [draw_split(task, cases=cases, task_path=task_path)]
    else:
        splits = [
            draw_split(task, shots=cfg.split.shots, seed=cfg.split.seed + d, task_path=task_path)
            for d in range(cfg.split.num_draws)
        ]
    if scored_on is not None:
        splits = [score_on(s, scored_on[0], task, scored_on[1]) for s in splits]
    if cfg.max_eval_cases:
        splits = [replace(s, eval=s.eval[: cfg.max_eval_cases]) for s in splits]
    return splits


def load_cases(task: Task, names: set[str], progress: bool = True) -> dict[str, LoadedCase]:
    """Read and check every named case (ValueError naming the file on any problem)."""
    from tqdm import tqdm

    by_name = {c.name: c for c in task.cases}
    loaded = {}
    bar = tqdm(sorted(names), desc="read cases", unit="case", leave=False, disable=not progress)
    for name in bar:
        loaded[name] = load_case(by_name[name])
    return loaded


def read_unlabelled(path: str | Path, scored_images: set[Path]) -> tuple[str, list[tuple[str, Path]]]:
    """(description, [(name, resolved image path)]) of --unlabelled's images; ValueError when one of them is
    a scored image (self-training on it would fit the model to the very images it is scored on)."""
    description, images = unlabelled_images(path)
    resolved = [(name, image.resolve()) for name, image, _fov in images]
    clash = [name for name, image in resolved if image in scored_images]
    if clash:
        raise ValueError(
            f"--unlabelled {path}: image(s) {', '.join(clash[:5])}{' ...' if len(clash) > 5 else ''} are "
            "among the images scored; give images the run is not scored on (a task's train split, or a "
            "folder of other images)"
        )
    return description, resolved


def load_unlabelled(path: str | Path, names: set[str], progress: bool = True) -> dict[str, UnlabelledImage]:
    """(image, FOV or None) of the named --unlabelled images, checked (ValueError naming the file)."""
    from tqdm import tqdm

    from data_engine.io import read_image, read_mask

    files = {name: (image, fov) for name, image, fov in unlabelled_images(path)[1]}
    loaded: dict[str, UnlabelledImage] = {}
    for name in tqdm(
        sorted(names), desc="read unlabelled images", unit="image", leave=False, disable=not progress
    ):
        image_path, fov_path = files[name]
        image = read_image(image_path)
        fov = None if fov_path is None else read_mask(fov_path)
        if fov is not None and fov.shape != image.shape[:2]:
            raise ValueError(
                f"--unlabelled {path}: fov {fov_path} is {fov.shape[1]}x{fov.shape[0]} px but image "
                f"{image_path} is {image.shape[1]}x{image.shape[0]} px (width x height); they must match"
            )
        loaded[name] = (image, fov)
    return loaded


# --- the run folder ---


def prepare_run_dir(
    out: Path,
    cfg_dict: dict[str, Any],
    resume: bool,
    overwrite: bool,
    *,
    kind: str = "univg run",
    owned: Callable[[Any], bool] | None = None,
) -> None:
    """Create the run folder, or check it may be continued (same config) or replaced (--overwrite).

    `owned(config)` says whether the config.yaml found there was written by this kind of run (default:
    any config.yaml); a folder that is not ours is never deleted nor resumed."""
    config_path = out / CONFIG_FILE
    if resume and overwrite:
        raise ValueError("--overwrite deletes the run that --resume auto would continue: give one of them")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()):
        previous = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
        ours = config_path.is_file() and (owned is None or owned(previous))
        if overwrite:
            if not ours:
                raise FileExistsError(
                    f"--out {out} is not empty and holds no {CONFIG_FILE} of a {kind}: not a {kind}, so "
                    "--overwrite will not delete it; choose another --out"
                )
            shutil.rmtree(out)
        elif resume:
            if not ours:
                raise FileExistsError(
                    f"--resume auto: {out} holds no {CONFIG_FILE} of a {kind}; nothing to resume"
                )
            if previous != cfg_dict:
                diffs = config_differences(previous, cfg_dict)
                raise ValueError(
                    f"--resume auto: {config_path} differs from this run's config ({'; '.join(diffs[:5])}); "
                    "use the same settings, --overwrite, or a new --out"
                )
        else:
            raise FileExistsError(
                f"--out {out} already holds a run; pass --resume auto to continue it or --overwrite to "
                "replace it"
            )
    out.mkdir(parents=True, exist_ok=True)
    if not config_path.is_file():
        tmp = config_path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
        tmp.replace(config_path)


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Where two config dicts differ, as "dotted.key: old -> new" lines (nested dicts walked key by key)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += config_differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def setup_logging(out: Path) -> list[logging.Handler]:
    """INFO to the console and to <out>/finetune.log, for this package's loggers."""
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [
        logging.StreamHandler(sys.stdout),
        logging.FileHandler(out / "finetune.log"),
    ]
    for h in handlers:
        h.setFormatter(fmt)
    for name in ("univg.finetune", "finetune", "data_engine"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        for h in handlers:
            logger.addHandler(h)
    return handlers


def close_logging(handlers: list[logging.Handler]) -> None:
    """Detach and close the handlers setup_logging attached."""
    for name in ("univg.finetune", "finetune", "data_engine"):
        logger = logging.getLogger(name)
        for h in handlers:
            logger.removeHandler(h)
    for h in handlers:
        h.close()


# --- stages ---


def train_model(
    cfg: FinetuneConfig,
    loaded: dict[str, LoadedCase],
    train_names: list[str],
    synthetic: Any,
    folder: Path,
    method: str,
    progress: bool,
    init_from: str | Path | None = None,
    unlabelled: Sequence[UnlabelledImage] = (),
    pseudo_from: Sequence[UnlabelledImage] = (),
) -> tuple[Segmenter, Path]:
    """Train one segmenter into folder/model (or load it when it is there), with its threshold set by the
    profile's rule; returns it and its folder. The arguments are train_and_evaluate's."""
    from finetune.segmenter import Segmenter, train_segmenter

    model_dir = folder / "model"
    if (model_dir / "config.json").is_file():
        segmenter = Segmenter.load(model_dir)
        log.info("%s: segmenter loaded from %s", folder.name, model_dir)
    else:
        real = [loaded[n] for n in train_names]
        seg_cfg = cfg.segmenter
        if seg_cfg.pseudo.enabled and method not in seg_cfg.pseudo.methods:
            # a method that does not self-train by design (the baseline, full supervision): its record says
            # so, and its log carries no "no unlabelled image" warning meant for a self-training method
            seg_cfg = replace(seg_cfg, pseudo=replace(seg_cfg.pseudo, enabled=False))
        segmenter = train_segmenter(
            seg_cfg,
            real,
            synthetic=synthetic,
            progress=progress,
            init_from=init_from,
            unlabelled=pseudo_from,
        )
        segmenter.save(model_dir)
    infer = cfg.segmenter.infer
    if "field_from_image" not in segmenter.record:
        # a model saved before train_segmenter made this decision itself
        segmenter.record["field_from_image"] = decide_field(
            infer.field_from_image, [(image, mask) for image, mask, _fov in (loaded[n] for n in train_names)]
        )
        segmenter.save_config(model_dir)
        log.info(
            "%s: field of view from the image: %s", folder.name, segmenter.record["field_from_image"]["why"]
        )
    area_done = str(segmenter.record.get("threshold_source", "")).startswith("area")
    if infer.tune_threshold and infer.threshold_rule == "area" and unlabelled and not area_done:
        from finetune.segmenter import area_threshold

        shots = [loaded[n] for n in train_names]
        started = time.perf_counter()
        shots_threshold = segmenter.threshold
        segmenter.threshold, fraction = area_threshold(
            [m for _i, m, _f in shots],
            [f for _i, _m, f in shots],
            [segmenter.predict_output(image) for image, _f in unlabelled],
            [f for _i, f in unlabelled],
        )
        segmenter.record["threshold_source"] = (
            f"area: the shots' vessel fraction {fraction:.4f} predicted over {len(unlabelled)} unlabelled "
            "image(s)"
        )
        segmenter.record["shots_threshold"] = shots_threshold
        segmenter.save_config(model_dir)
        log.info(
            "%s: threshold %.3f (%s; %.0f s)",
            folder.name,
            segmenter.threshold,
            segmenter.record["threshold_source"],
            time.perf_counter() - started,
        )
    return segmenter, model_dir


def train_and_evaluate(
    cfg: FinetuneConfig,
    task: Task,
    loaded: dict[str, LoadedCase],
    train_names: list[str],
    eval_names: list[str],
    synthetic: Any,
    folder: Path,
    info: dict[str, Any],
    progress: bool,
    init_from: str | Path | None = None,
    unlabelled: Sequence[UnlabelledImage] = (),
    pseudo_from: Sequence[UnlabelledImage] = (),
    scored_task: Task | None = None,
    eval_scale: float = 1.0,
) -> dict[str, Any]:
    """Train one segmenter (unless folder/model exists), score it on eval_names; returns the eval summary.
    `init_from`: a segmenter folder whose weights the training starts from. `unlabelled`: (image, FOV) of
    the images, without labels, that the "area" threshold rule predicts. `pseudo_from`: (image, FOV) of the
    images, without labels, that self-training labels (segmenter.pseudo). `scored_task`: the task
    eval_names are cases of, when not `task` (--eval-task). `eval_scale`: each scored image is resized by it
    for the network (Segmenter.predict_proba's scale) and its mask comes back at the image's own size."""
    import cv2

    from finetune.evaluate import evaluate_cases

    eval_summary = folder / "eval" / SUMMARY_FILE
    if eval_summary.is_file():
        log.info("%s: done already (%s)", folder.name, eval_summary)
        done = dict(json.loads(eval_summary.read_text()))
        # where they are now: a finished run moved or renamed since still resumes and summarises
        done.update(model=str(folder / "model"), predictions=str(folder / "eval" / PRED_DIR))
        return done
    segmenter, model_dir = train_model(
        cfg,
        loaded,
        train_names,
        synthetic,
        folder,
        str(info.get("method")),
        progress,
        init_from,
        unlabelled,
        pseudo_from,
    )
    scored_task = task if scored_task is None else scored_task
    by_name = {c.name: c for c in scored_task.cases}
    cases: list[Case] = [by_name[n] for n in eval_names]

    pred_dir = folder / "eval" / PRED_DIR
    pred_dir.mkdir(parents=True, exist_ok=True)

    def predict(case: Case, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        prob = segmenter.predict_output(image, eval_scale)
        pred = prob > segmenter.threshold
        cv2.imwrite(str(pred_dir / f"{case.name}.png"), np.where(pred, np.uint8(255), np.uint8(0)))
        return pred, prob

    full_info = {
        **info,
        "model": str(model_dir),
        "predictions": str(pred_dir),
        "threshold": segmenter.threshold,
        "threshold_source": segmenter.record.get("threshold_source"),
        "pseudo_labels": segmenter.record.get("pseudo_labels"),  # self-training, when it ran
        "field_from_image": segmenter.record.get("field_from_image"),
        "input_polarity": segmenter.record.get("input_polarity"),
        "initial_weights": None if init_from is None else str(init_from),
        "train_cases": train_names,
        "train_wall_s": segmenter.record.get("wall_s"),
    }
    started = time.perf_counter()
    summary = evaluate_cases(
        scored_task, cases, predict, folder / "eval", full_info, overlays=cfg.overlays, progress=progress
    )
    log.info(
        "%s: Dice %.4f +- %.4f on %d case(s) | clDice %.4f | eval %.0f s",
        folder.relative_to(folder.parents[1]) if len(folder.parents) > 1 else folder,
        summary["mean"]["dice"],
        summary["std"]["dice"] or 0.0,
        summary["num_cases"],
        summary["mean"]["cldice"],
        time.perf_counter() - started,
    )
    return summary


def synthesize(
    cfg: FinetuneConfig,
    loaded: dict[str, LoadedCase],
    split: Split,
    folder: Path,
    draw: int,
    progress: bool,
) -> Any:
    """Make (or reuse) the draw's synthetic set in folder; returns a re-iterable of (image, mask) pairs. Shots
    larger than the network input (segmenter.input.max_side_px) are synthesised from at that size, where
    training would downscale the pairs anyway."""
    from finetune.synthesis import ShotSynthesizer, write_synthetic

    syn_cfg = replace(cfg.synthesis, seed=cfg.synthesis.seed + 1000 * draw)
    started = time.perf_counter()
    shots = [at_input_size(loaded[n], cfg.segmenter.input.max_side_px) for n in split.train]
    synth = ShotSynthesizer(shots, syn_cfg, names=split.train)
    write_synthetic(synth, folder, progress=progress, config=to_dict(syn_cfg))
    log.info(
        "draw %d: %d synthetic pairs from %d shot(s) in %s (%.0f s; preview %s)",
        draw,
        len(synth),
        len(split.train),
        folder,
        time.perf_counter() - started,
        folder / "preview.png",
    )
    return _ShardPairs(folder)


def at_input_size(case: LoadedCase, max_side_px: int) -> LoadedCase:
    """A case downscaled to the network's input size (finetune.sampler.input_size): the image area-averaged,
    mask and FOV as prepare_mask makes them ({0, 255}); unchanged when it is no larger."""
    from finetune.sampler import input_size, prepare_mask

    image, mask, fov = case
    height, width = input_size(image.shape[0], image.shape[1], max_side_px)
    if (height, width) == image.shape[:2]:
        return case
    small = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    binary = [None if m is None else prepare_mask(m, height, width) * np.uint8(255) for m in (mask, fov)]
    assert binary[0] is not None
    return small, binary[0], binary[1]


class _ShardPairs:
    """The synthetic set read back from its shards, as (image, mask) pairs; iterable any number of times."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __iter__(self) -> Any:
        from shards.inspect import iter_corpus
        from shards.manifest import load_manifest

        manifest = load_manifest(self.folder)
        for _key, sample, _members in iter_corpus(self.folder, manifest):
            yield sample.image, sample.mask


class _WithRehearsal:
    """A re-iterable synthetic set with engine-corpus pairs mixed in (rehearsal): of each pass's pairs,
    `share` are corpus pairs, spread evenly, and the rest the set's own, in their order. The corpus pairs go
    on from one pass to the next, so a long fine-tuning keeps seeing new ones. An empty set mixes in
    nothing."""

    def __init__(self, synthetic: Any, corpus: Any, share: float, announce: str = "") -> None:
        self.synthetic = synthetic
        self.corpus = corpus  # an endless iterator of (image, mask) pairs
        self.share = share
        self.announce = announce  # logged when training first draws from the set (not for a finished stage)

    def __iter__(self) -> Any:
        if self.announce:
            log.info("%s", self.announce)
            self.announce = ""
        own = iter(self.synthetic)
        n = 0
        while True:
            if math.floor((n + 1) * self.share) > math.floor(n * self.share):
                yield next(self.corpus)
            else:
                try:
                    yield next(own)
                except StopIteration:
                    return
            n += 1


def checkout_path(value: str) -> str:
    """A path a config names, made absolute (so a run resumed from another folder reads the same file):
    from the working folder when it exists there, else the univg checkout's own file of that name when there
    is one (the profiles name the shipped start and corpus config relative to the checkout, so a run started
    from any folder finds them). Empty and absolute values are kept; one found nowhere is named as given,
    for the check that reads it to report."""
    if not value or Path(value).is_absolute():
        return value
    if Path(value).exists():
        return str(Path.cwd() / value)
    return str(ROOT / value) if (ROOT / value).exists() else value


def with_checkout_paths(cfg: FinetuneConfig) -> FinetuneConfig:
    """cfg with pretrained_segmenter and rehearsal.corpus looked up by checkout_path."""
    rehearsal = replace(cfg.rehearsal, corpus=checkout_path(cfg.rehearsal.corpus))
    return replace(cfg, pretrained_segmenter=checkout_path(cfg.pretrained_segmenter), rehearsal=rehearsal)


def checked_start(cfg: FinetuneConfig, started_methods: Sequence[str]) -> tuple[FinetuneConfig, Path | None]:
    """cfg with its start and rehearsal paths looked up (with_checkout_paths), its rehearsal corpus checked,
    and the pretrained start's folder, read and checked to be this run's network, or None when there is no
    start or none of started_methods (univg, univg_gen) runs. ValueError before anything is written."""
    cfg = with_checkout_paths(cfg)
    check_rehearsal(cfg)
    if not cfg.pretrained_segmenter or not {"univg", "univg_gen"} & set(started_methods):
        return cfg, None
    from finetune.segmenter import load_initial_weights

    init = Path(cfg.pretrained_segmenter).resolve()
    load_initial_weights(init, cfg.segmenter)
    return cfg, init


def check_rehearsal(cfg: FinetuneConfig) -> None:
    """The rehearsal corpus is a readable shard corpus, or a corpus config, holding the asked modalities
    (ValueError if not)."""
    r = cfg.rehearsal
    if not r.corpus:
        return
    from finetune.pretrain_segmenter import corpus_modalities, is_corpus_config

    try:
        held = sorted(corpus_modalities(r.corpus))
    except (OSError, ValueError, KeyError) as e:  # a bad config raises ConfigError, a ValueError
        kind = "corpus config" if is_corpus_config(r.corpus) else "shard corpus"
        raise ValueError(f"rehearsal.corpus={r.corpus}: not a {kind} ({e})") from e
    missing = sorted(set(r.modalities) - set(held))
    if missing:
        raise ValueError(f"rehearsal.corpus={r.corpus} holds no {missing} samples; it holds {held}")


def rehearsal_pairs(cfg: FinetuneConfig, draw: int) -> Any:
    """The endless stream of corpus pairs that draw `draw` rehearses (cfg.rehearsal.corpus must be set); it
    depends only on the seed and the draw, so a resumed run trains on what a whole one would."""
    from finetune.pretrain_segmenter import corpus_pairs
    from finetune.segmenter import CorpusPair  # marked: they keep the start's polarity (finetune/polarity.py)

    r = cfg.rehearsal
    pairs = corpus_pairs(r.corpus, r.seed + 1000 * draw, set(r.modalities) if r.modalities else None)
    if r.thin_px > 0:
        return (CorpusPair(image, thin_mask(mask, r.thin_px)) for image, mask in pairs)
    return (CorpusPair(image, mask) for image, mask in pairs)


def thin_mask(mask: np.ndarray, thin_px: float) -> np.ndarray:
    """The vessel mask (uint8 {0, 255}) without its pixels within thin_px of the background (Euclidean),
    its centreline kept: a vessel narrower than 2 * thin_px becomes its 1-px skeleton, not nothing."""
    from skimage.morphology import skeletonize

    vessel = mask > 0
    inside_px = cv2.distanceTransform(vessel.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    kept = (inside_px > thin_px) | skeletonize(vessel)
    return kept.astype(np.uint8) * 255


def with_rehearsal(cfg: FinetuneConfig, synthetic: Any, draw: int, method: str = "univg") -> Any:
    """The synthetic set, with the draw's corpus pairs (rehearsal_pairs) mixed in when cfg.rehearsal.corpus
    is set."""
    r = cfg.rehearsal
    if not r.corpus or synthetic is None:
        return synthetic
    modalities = ",".join(r.modalities) or "every modality"
    share = f"{100 * r.share:.0f}%"
    announce = f"draw {draw}: {method} rehearses {share} corpus pairs ({modalities}) from {r.corpus}"
    return _WithRehearsal(synthetic, rehearsal_pairs(cfg, draw), r.share, announce)


# --- the run ---


def resolve_generator(generator_dir: str | Path | None, cfg: FinetuneConfig) -> Path | None:
    """The generator folder univg_gen adapts (a checkpoint folder's generator/ is taken), checked."""
    if "univg_gen" not in cfg.methods:
        return None
    if generator_dir is None:
        raise ValueError(
            "method univg_gen needs a pretrained generator: pass --generator "
            "runs/<pretrain>/checkpoints/step_XXXXXXX (or drop univg_gen from --methods)"
        )
    path = Path(generator_dir)
    if (path / "generator").is_dir():
        path = path / "generator"
    from pretrain.model import read_generator_info

    try:
        info = read_generator_info(path)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ValueError(f"--generator {generator_dir}: not a univg generator folder ({e})") from e
    if info.model.kind != "unet":
        raise ValueError(
            f"--generator {generator_dir}: a {info.model.kind} generator; few-shot adaptation (univg_gen) "
            "supports the pixel-space UNet generator (model.kind: unet) only, so far"
        )
    return path


def run_finetune(
    task_path: str | Path,
    out: str | Path,
    cfg: FinetuneConfig,
    cases: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    generator_dir: str | Path | None = None,
    eval_task_path: str | Path | None = None,
    unlabelled_path: str | Path | None = None,
    eval_scale: float = 1.0,
) -> dict[str, Any]:
    """`univg finetune` as a function (module docstring); returns the run summary. `generator_dir` (a
    pretrained generator folder, or a checkpoint folder holding generator/) is needed for univg_gen.
    `eval_task_path`: score on that task instead (--eval-task); every training input stays task_path's.
    `unlabelled_path`: the images (a task's non-test cases, or a folder of images) that self-training and
    the area threshold rule read, without labels, instead of the task's labelled pool minus the shots
    (--unlabelled); none of them may be a scored image, and a draw's own shots are left out of them.
    `eval_scale`: the scored images are resized by it for the network, their masks scored at their own size
    (--eval-scale: the shots' pixel size over the scored images', e.g. 0.5 for a set at twice the resolution;
    training, self-training and the area rule read their images as they are)."""
    out = Path(out)
    started = time.perf_counter()
    # everything read and checked first: a bad input stops the run before it writes anything
    check_scale(eval_scale, "--eval-scale")
    cfg, init = checked_start(cfg, started_methods=cfg.methods)
    generator = resolve_generator(generator_dir, cfg)
    task = read_task(task_path)
    scored = task if eval_task_path is None else read_task(eval_task_path)
    splits = plan_splits(
        task, task_path, cfg, cases, None if eval_task_path is None else (scored, eval_task_path)
    )
    infer = cfg.segmenter.infer
    area_rule = infer.tune_threshold and infer.threshold_rule == "area"
    pseudo = cfg.segmenter.pseudo
    self_train = pseudo.enabled and bool(set(pseudo.methods) & set(cfg.methods))  # else nothing to load
    scored_names = {n for s in splits for n in s.eval}
    external: dict[str, UnlabelledImage] = {}
    if unlabelled_path is None:
        area_names = [unlabelled_cases(s, infer.area_images) if area_rule else [] for s in splits]
        pseudo_names = [unlabelled_cases(s, pseudo.max_images) if self_train else [] for s in splits]
        unlabelled_from = None
    else:  # the same images for every draw, less that draw's shots (when --unlabelled is the shot task)
        by_name = {c.name: c for c in scored.cases}
        unlabelled_from, external_images = read_unlabelled(
            unlabelled_path, {by_name[n].image_path.resolve() for n in scored_names}
        )
        task_images = {c.name: c.image_path.resolve() for c in task.cases}

        def not_shots(split: Split) -> list[str]:
            shots = {task_images[n] for n in split.train}
            return [name for name, image in external_images if image not in shots]

        area_names = [spread(not_shots(s), infer.area_images) if area_rule else [] for s in splits]
        pseudo_names = [spread(not_shots(s), pseudo.max_images) if self_train else [] for s in splits]
    needed = {n for s in splits for n in s.train}
    if unlabelled_path is None:
        needed |= {n for u in area_names + pseudo_names for n in u}
    if "full" in cfg.methods:
        needed |= set(splits[0].full_train)
    if scored is task:
        needed |= scored_names
    loaded = load_cases(task, needed, progress)
    loaded_scored = loaded if scored is task else load_cases(scored, scored_names, progress)
    if unlabelled_path is not None:
        external = load_unlabelled(
            unlabelled_path, {n for u in area_names + pseudo_names for n in u}, progress
        )

    def without_labels(names: list[str]) -> list[UnlabelledImage]:
        return [external[n] if unlabelled_path is not None else (loaded[n][0], loaded[n][2]) for n in names]

    unlabelled = [without_labels(u) for u in area_names]
    pseudo_from = [without_labels(u) for u in pseudo_names]
    cfg_dict = {
        "task": str(task_path),
        **({} if eval_task_path is None else {"eval_task": str(eval_task_path)}),
        **({} if unlabelled_path is None else {"unlabelled": str(unlabelled_path)}),
        **({} if eval_scale == 1.0 else {"eval_scale": eval_scale}),
        "cases": cases,
        "generator": None if generator is None else str(generator),
        **to_dict(cfg),
    }
    prepare_run_dir(out, cfg_dict, resume, overwrite)
    handlers = setup_logging(out)
    try:
        log.info(
            "univg finetune: task %s (%d cases) | %d draw(s) of %d shot(s) | methods %s | %d scored case(s) "
            "(%s) | run %s",
            task.name,
            len(task.cases),
            len(splits),
            splits[0].shots,
            ",".join(cfg.methods),
            len(splits[0].eval),
            splits[0].eval_from,
            out,
        )
        results: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.methods}
        # in every evaluation summary: the task scored, and the one trained on when it is another
        where: dict[str, Any] = {"task_path": str(task_path if eval_task_path is None else eval_task_path)}
        if eval_task_path is not None:
            where["trained_on_task_path"] = str(task_path)
        if eval_scale != 1.0:
            where["eval_scale"] = eval_scale
        if "full" in cfg.methods:
            s0 = splits[0]
            info = {"method": "full", **where, "cases_from": s0.eval_from}
            results["full"].append(
                train_and_evaluate(
                    cfg,
                    task,
                    loaded,
                    s0.full_train,
                    s0.eval,
                    None,
                    out / "full",
                    info,
                    progress,
                    scored_task=scored,
                    eval_scale=eval_scale,
                )
            )
        for d, split in enumerate(splits):
            draw_dir = out / f"draw_{d}"
            write_split(split, draw_dir)
            log.info("draw %d: shots %s (seed %s)", d, ", ".join(split.train), split.seed)
            base_info = {**where, "cases_from": split.eval_from, "draw": d}
            if "univg" in cfg.methods:
                synthetic = synthesize(cfg, loaded, split, draw_dir / "synthetic", d, progress)
                results["univg"].append(
                    train_and_evaluate(
                        cfg,
                        task,
                        loaded,
                        split.train,
                        split.eval,
                        with_rehearsal(cfg, synthetic, d),
                        draw_dir / "univg",
                        {**base_info, "method": "univg"},
                        progress,
                        init,
                        unlabelled[d],
                        pseudo_from[d] if "univg" in pseudo.methods else [],
                        scored_task=scored,
                        eval_scale=eval_scale,
                    )
                )
            if "univg_gen" in cfg.methods:
                from finetune.feedback import generator_synthetic_set

                assert generator is not None  # resolve_generator made sure
                gen_dir = draw_dir / "univg_gen"
                syn_dir, fraction, selection = generator_synthetic_set(
                    cfg, [loaded[n] for n in split.train], split.train, gen_dir, generator, d, progress
                )
                patch = replace(cfg.segmenter.patch, synthetic_fraction=fraction)
                results["univg_gen"].append(
                    train_and_evaluate(
                        replace(cfg, segmenter=replace(cfg.segmenter, patch=patch)),
                        task,
                        loaded,
                        split.train,
                        split.eval,
                        with_rehearsal(
                            cfg, None if syn_dir is None else _ShardPairs(syn_dir), d, "univg_gen"
                        ),
                        gen_dir,
                        {**base_info, "method": "univg_gen", "feedback": selection},
                        progress,
                        init,
                        unlabelled[d],
                        pseudo_from[d] if "univg_gen" in pseudo.methods else [],
                        scored_task=scored,
                        eval_scale=eval_scale,
                    )
                )
            if "baseline" in cfg.methods:
                results["baseline"].append(
                    train_and_evaluate(
                        cfg,
                        task,
                        loaded,
                        split.train,
                        split.eval,
                        None,
                        draw_dir / "baseline",
                        {**base_info, "method": "baseline"},
                        progress,
                        unlabelled=unlabelled[d],
                        pseudo_from=pseudo_from[d] if "baseline" in pseudo.methods else [],
                        scored_task=scored,
                        eval_scale=eval_scale,
                    )
                )
        main_method = next(m for m in ("univg", "univg_gen", "baseline", "full") if m in cfg.methods)
        source = out / ("full" if main_method == "full" else f"draw_0/{main_method}") / "model"
        if not (out / "model" / "config.json").is_file():
            shutil.copytree(source, out / "model", dirs_exist_ok=True)
        summary = _summarise(task, task_path, cfg, splits, results, time.perf_counter() - started, out)
        summary["unlabelled_from"] = unlabelled_from  # None: the task's labelled pool minus the shots
        summary["unlabelled_path"] = None if unlabelled_path is None else str(unlabelled_path)
        summary["eval_scale"] = eval_scale
        _write_report(summary, out)
        _comparison_picture(loaded_scored, splits[0], cfg, out)
        tmp = out / (SUMMARY_FILE + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(out / SUMMARY_FILE)
        for method, stats in summary["methods"].items():
            log.info(
                "%-8s Dice %.4f +- %.4f over %d draw(s) | clDice %.4f | NSD %.4f",
                method,
                stats["dice"]["mean"],
                stats["dice"]["std"],
                stats["num_draws"],
                stats["cldice"]["mean"],
                stats["nsd"]["mean"],
            )
        log.info("wrote %s, report.md, comparison.png (%.0f s)", out / SUMMARY_FILE, summary["wall_s"])
        return summary
    finally:
        close_logging(handlers)


def _summarise(
    task: Task,
    task_path: str | Path,
    cfg: FinetuneConfig,
    splits: list[Split],
    results: dict[str, list[dict[str, Any]]],
    wall_s: float,
    out: Path,
) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for method, evals in results.items():
        if not evals:
            continue
        stats: dict[str, Any] = {"num_draws": len(evals)}
        for name in METRICS:
            values = [e["mean"][name] for e in evals if e["mean"][name] is not None]
            stats[name] = {
                "mean": float(np.mean(values)) if values else None,
                # std over draws (population); one draw has none
                "std": float(np.std(values)) if len(values) > 1 else 0.0,
                "per_draw": values,
            }
        stats["eval"] = [
            str(Path(e["model"]).parent.relative_to(out) / "eval") for e in evals if "model" in e
        ]
        stats["train_wall_s"] = [e.get("train_wall_s") for e in evals]
        stats["threshold"] = [e.get("threshold") for e in evals]  # per draw (full: its one run)
        stats["threshold_source"] = [e.get("threshold_source") for e in evals]
        # per draw: unlabelled images self-training labelled (0 when it did not run)
        stats["pseudo_images"] = [(e.get("pseudo_labels") or {}).get("num_images", 0) for e in evals]
        # per draw: whether masks were cleared outside the field estimated from the image
        stats["field_from_image"] = [bool((e.get("field_from_image") or {}).get("used")) for e in evals]
        # per draw: whether the task's images went into the network inverted (finetune/polarity.py)
        stats["inverted"] = [bool((e.get("input_polarity") or {}).get("inverted")) for e in evals]
        methods[method] = stats
    optim = cfg.segmenter.optim
    started = [m for m in ("univg", "univg_gen") if m in methods] if cfg.pretrained_segmenter else []
    return {
        "format": "univg-finetune/1",
        "task": task.name,
        "task_path": str(task_path),
        "shots": splits[0].shots,
        "num_draws": len(splits),
        "draws": [{"seed": s.seed, "train": s.train} for s in splits],
        "num_eval_cases": len(splits[0].eval),
        "eval_from": splits[0].eval_from,
        "eval_task": splits[0].eval_task,  # None: scored on the task itself
        "eval_task_path": splits[0].eval_task_path,
        "segmenter": {
            "arch": cfg.segmenter.net.arch,
            "steps": cfg.segmenter.optim.max_steps,
            "patch_px": cfg.segmenter.patch.patch_size_px,
            "batch": cfg.segmenter.patch.batch_size,
            "lr": optim.lr,
            "pseudo_threshold_rule": cfg.segmenter.pseudo.threshold_rule,  # where pseudo-labels are cut
            "pretrained_start": None
            if not started
            else {
                "weights": str(Path(cfg.pretrained_segmenter).resolve()),
                "methods": started,
                "peak_lr": optim.pretrained_lr or optim.lr,
            },
            "rehearsal": None  # corpus pairs mixed into the synthetic stream of univg and univg_gen
            if not (cfg.rehearsal.corpus and {"univg", "univg_gen"} & set(methods))
            else {
                "corpus": cfg.rehearsal.corpus,
                "share": cfg.rehearsal.share,
                "modalities": list(cfg.rehearsal.modalities),
            },
        },
        "synthetic_pairs_per_draw": cfg.synthesis.num_pairs if "univg" in methods else 0,
        "methods": methods,
        "wall_s": round(wall_s, 1),
        "machine": machine_record(),
    }


def machine_record() -> dict[str, Any]:
    """What the scores were computed on. CPU training repeats bit for bit on one machine, but may not on a
    CPU with other vector units (its float kernels can round differently), so a run records its CPU, the
    vector level torch uses, the GPU if any, and the numeric packages' versions."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    cpu = platform.processor() or platform.machine()
    cpu_id = None  # x86 family and model: one marketing name ("AMD EPYC") covers CPU generations
    try:
        with open("/proc/cpuinfo") as f:  # Linux: the first CPU's fields; elsewhere platform's answer stays
            fields: dict[str, str] = {}
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
        cpu = fields.get("model name", cpu)
        if "cpu family" in fields and "model" in fields:
            cpu_id = f"family {fields['cpu family']} model {fields['model']}"
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for package in ("torch", "numpy", "opencv-python-headless", "monai", "accelerate"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu,
        "cpu_id": cpu_id,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "packages": versions,
    }


def machine_line(m: dict[str, Any]) -> str:
    """One line for a machine_record: CPU, family and model, (vector level, cores), GPU if any."""
    cpu_id = f", {m['cpu_id']}" if m.get("cpu_id") else ""  # records written before cpu_id lack it
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ""
    return f"{m['cpu']}{cpu_id} ({m['cpu_capability']}, {m['cpu_count']} cores){gpu}"


_METHOD_NOTES = {
    "univg": "the shots + synthetic pairs made from them by the data engine",
    "univg_gen": "the shots + images the generator adapted to them draws for recombined masks",
    "baseline": "the same shots with standard augmentation only",
    "full": "every label of the training pool (the upper bound)",
}


def start_line(segmenter: dict[str, Any]) -> str:
    """Where each method's training starts and at which peak rate, and what univg rehearses (summary.json's
    segmenter block)."""
    lr = segmenter.get("lr")
    start = segmenter.get("pretrained_start")
    if lr is None:  # a summary from before the rates were recorded
        return "Starting weights: not recorded."
    if not start:
        line = f"Every method starts from random weights, peak lr {lr:g}."
    else:
        verb = "starts" if len(start["methods"]) == 1 else "start"
        line = (
            f"{' and '.join(start['methods'])} {verb} from the pretrained segmenter `{start['weights']}` at "
            f"peak lr {start['peak_lr']:g}; the other methods from random weights at {lr:g}."
        )
    rehearsal = segmenter.get("rehearsal")
    if rehearsal:
        modalities = ", ".join(rehearsal["modalities"]) or "every modality"
        line += (
            f" {100 * rehearsal['share']:.0f}% of the synthetic pairs are pairs of the corpus "
            f"`{rehearsal['corpus']}` ({modalities}; rehearsal, against forgetting what it taught)."
        )
    return line


def _trainings_where(summary: dict[str, Any], flag: str) -> str:
    """Per method, in how many trainings a per-draw flag of summary.json's methods was set ("univg 2 of 3,
    baseline 0 of 3"); empty when in none."""
    flags = {m: st.get(flag) or [] for m, st in summary["methods"].items()}
    if not any(any(f) for f in flags.values()):
        return ""
    return ", ".join(f"{m} {sum(f)} of {len(f)}" for m, f in flags.items())


def _write_report(summary: dict[str, Any], out: Path) -> None:
    def cell(stats: dict[str, Any], name: str) -> str:
        m = stats[name]
        if m["mean"] is None:
            return "-"
        return f"{m['mean']:.4f} +- {m['std']:.4f}" if stats["num_draws"] > 1 else f"{m['mean']:.4f}"

    lines = [
        f"# Few-shot segmentation: {summary['task']}"
        + (f", scored on {summary['eval_task']}" if summary.get("eval_task") else "")
        + (
            f", its images resized by {summary['eval_scale']:g} for the network"
            if summary.get("eval_scale", 1.0) != 1.0
            else ""
        ),
        "",
        f"{summary['shots']} shot(s), {summary['num_draws']} draw(s); scored on {summary['num_eval_cases']} "
        f"case(s) ({summary['eval_from']}). Segmenter: {summary['segmenter']['arch']}, "
        f"{summary['segmenter']['steps']} steps, the same for every method. Mean +- std over draws.",
        "",
        start_line(summary["segmenter"]),
        "",
        "| method | what it trains on | Dice | clDice | NSD (2 px) | IoU | AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, stats in summary["methods"].items():
        cells = [cell(stats, n) for n in ("dice", "cldice", "nsd", "iou", "auc")]
        lines.append(f"| {method} | {_METHOD_NOTES[method]} | {' | '.join(cells)} |")
    self_trained = [m for m, st in summary["methods"].items() if any(st.get("pseudo_images") or [])]
    if self_trained:
        lines += [
            "",
            f"Self-training (segmenter.pseudo): {', '.join(self_trained)} also trained on pseudo-labels of "
            + (
                f"the images of `--unlabelled` {summary['unlabelled_from']}"
                if summary.get("unlabelled_from")
                else f"{summary['task']}'s unlabelled images (its labelled pool minus the shots, labels "
                "never read)"
            )
            + ", which the baseline does not see; counts per draw below. The labels are cut "
            + (
                "where their vessel fraction equals the shots' labelled one (pseudo.threshold_rule=area)."
                if summary["segmenter"].get("pseudo_threshold_rule") == "area"
                else "at the threshold best on the shots at that moment."
            ),
        ]
    cleared = _trainings_where(summary, "field_from_image")
    if cleared:
        lines += [
            "",
            "Field of view from the image (segmenter.infer.field_from_image): masks cleared outside the "
            f"dark or white flat region joined to each image's border in {cleared} trainings (used where "
            "every shot keeps its labelled vessels inside the estimate).",
        ]
    inverted = _trainings_where(summary, "inverted")
    if inverted:
        lines += [
            "",
            "Polarity (segmenter.input.polarity): the task's images went into the network inverted in "
            f"{inverted} trainings (where the pretrained start read the shots better inverted; "
            "finetune/polarity.py).",
        ]
    lines += ["", "![comparison](comparison.png)", ""]
    lines += [
        "Comparison: image | label | each method's errors on that image (white: found vessel, red: false "
        "vessel, blue: missed vessel, dark grey: outside the field of view).",
        "",
        "## Draws",
        "",
    ]
    for d, draw in enumerate(summary["draws"]):
        row = [f"- draw {d} (seed {draw['seed']}): shots {', '.join(draw['train'])}"]
        for method, stats in summary["methods"].items():
            if method != "full" and d < len(stats["dice"]["per_draw"]):
                entry = f"{method} Dice {stats['dice']['per_draw'][d]:.4f}"
                thresholds = stats.get("threshold") or []
                if d < len(thresholds) and thresholds[d] is not None:
                    source = str((stats.get("threshold_source") or [None] * (d + 1))[d] or "")
                    rule = (
                        "area rule"
                        if source.startswith("area")
                        else "max Dice on the shots"
                        if "shots" in source
                        else "fixed"
                    )
                    entry += f" (threshold {thresholds[d]:.3g}, {rule})"
                pseudo = stats.get("pseudo_images") or []
                if d < len(pseudo) and pseudo[d]:
                    entry += f", self-trained on {pseudo[d]} unlabelled image(s)"
                row.append(entry)
        lines.append(" | ".join(row))
    lines += [
        "",
        "Per-case scores and overlays: `draw_<d>/<method>/eval/` and `full/eval/` (report.md, cases.csv).",
        "Synthetic pairs of draw 0: `draw_0/synthetic/preview.png`.",
        "",
    ]
    m = summary.get("machine")
    if m:
        lines += [
            f"Machine: {machine_line(m)}; torch {m['packages']['torch']}, Python {m['python']}."
            " CPU results repeat bit for bit on the same machine, not always on a CPU with other vector"
            " units.",
            "",
        ]
    (out / "report.md").write_text("\n".join(lines))


def _comparison_picture(
    loaded: dict[str, LoadedCase], split: Split, cfg: FinetuneConfig, out: Path, num_cases: int = 3
) -> None:
    """comparison.png: for the first few scored cases, image | label | each method's error map."""
    import cv2

    from finetune.evaluate import error_map
    from finetune.synthesis import fit_tile

    folders = {m: out / ("full" if m == "full" else f"draw_0/{m}") / "eval" for m in cfg.methods}
    scores = {
        m: {c["case"]: c["dice"] for c in json.loads((f / SUMMARY_FILE).read_text())["per_case"]}
        for m, f in folders.items()
        if (f / SUMMARY_FILE).is_file()
    }
    rows = []
    tile = 256
    font = cv2.FONT_HERSHEY_SIMPLEX
    for name in split.eval[:num_cases]:
        image, label, fov = loaded[name]
        tiles = [fit_tile(image, tile), fit_tile(label, tile)]
        cv2.putText(tiles[0], name, (4, 16), font, 0.45, (0, 255, 255), 1, cv2.LINE_AA)
        cv2.putText(tiles[1], "label", (4, 16), font, 0.45, (0, 255, 255), 1, cv2.LINE_AA)
        for method, folder in folders.items():
            pred = cv2.imread(str(folder / PRED_DIR / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
            if pred is None:
                continue
            t = fit_tile(error_map(pred > 0, label > 0, fov), tile)
            dice = scores.get(method, {}).get(name)
            text = method if dice is None else f"{method} Dice {dice:.3f}"
            cv2.putText(t, text, (4, 16), font, 0.45, (0, 255, 255), 1, cv2.LINE_AA)
            tiles.append(t)
        gap = np.full((tile, 4, 3), 96, np.uint8)
        rows.append(np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1))
    if not rows:
        return
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=96) for r in rows]
    cv2.imwrite(str(out / "comparison.png"), np.concatenate(rows, axis=0))


# --- CLI ---


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `univg finetune`."""
    parser.description = (
        "Few-shot vessel segmentation: draw shots, synthesise pairs from them, train and score segmenters "
        "(univg, the augmentation-only baseline, full supervision) and write a report."
    )
    parser.add_argument(
        "--task", required=True, help="task manifest CSV, or a folder with images/ and masks/"
    )
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument(
        "--eval-task",
        default=None,
        help="score on this task's test split (or every case) instead: shots from one set tested on another",
    )
    parser.add_argument(
        "--eval-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="resize each scored image by F for the network, score its mask at its own size: the shots' "
        "pixel size over the scored images' (0.5 for a set at twice the resolution; default 1)",
    )
    parser.add_argument(
        "--unlabelled",
        default=None,
        metavar="TASK_OR_FOLDER",
        help="images self-training reads without labels, instead of the task's unused labelled cases: a task "
        "(its non-test cases) or a folder of images, e.g. the --eval-task set's own train split",
    )
    parser.add_argument(
        "--profile", default="cpu-fast", help="configs/finetune/<profile>.yaml (default cpu-fast)"
    )
    parser.add_argument("--config", default=None, help="a fine-tuning YAML instead of --profile")
    parser.add_argument(
        "--shots", type=int, default=None, help="labelled real cases per draw (default: config)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the first draw (default: config)")
    parser.add_argument("--draws", type=int, default=None, help="number of draws (default: config)")
    parser.add_argument("--cases", default=None, metavar="A,B,C", help="name the shots instead of drawing")
    parser.add_argument(
        "--methods", default=None, metavar="M,M", help="subset of univg,baseline,full (default: config)"
    )
    parser.add_argument(
        "--generator",
        default=None,
        help="pretrained generator (checkpoint folder or its generator/): adds the univg_gen method",
    )
    parser.add_argument("--resume", choices=["auto"], default=None, help="continue an interrupted run")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_options(parser, FinetuneConfig, skip=("methods",))  # --methods is a plain option
    parser.add_argument("overrides", nargs="*", help="dotted config overrides: segmenter.optim.max_steps=400")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The resolved config: the profile (or --config), dotted overrides, then the named options."""
    path = Path(args.config) if args.config else profile_path(args.profile)
    overrides = cli_overrides(args, args.overrides)
    if args.shots is not None:
        overrides.append(f"split.shots={args.shots}")
    if args.seed is not None:
        overrides.append(f"split.seed={args.seed}")
    if args.draws is not None:
        overrides.append(f"split.num_draws={args.draws}")
    if args.methods is not None:
        overrides.append(f"methods=[{args.methods}]")
    cfg = load_finetune_config(path, overrides)
    if args.generator is not None and args.methods is None and "univg_gen" not in cfg.methods:
        methods = list(cfg.methods)
        methods.insert(methods.index("univg") + 1 if "univg" in methods else 0, "univg_gen")
        cfg = replace(cfg, methods=tuple(methods))
    return cfg


def run(args: argparse.Namespace) -> int:
    """Run `univg finetune`."""
    cfg = config_from_args(args)
    cases = None
    if args.cases is not None:
        if args.shots is not None or args.draws is not None:
            raise ValueError("give --cases or --shots/--draws, not both")
        cases = args.cases.split(",")
    summary = run_finetune(
        args.task,
        args.out,
        cfg,
        cases=cases,
        resume=args.resume == "auto",
        overwrite=args.overwrite,
        progress=not args.no_progress,
        generator_dir=args.generator,
        eval_task_path=args.eval_task,
        unlabelled_path=args.unlabelled,
        eval_scale=args.eval_scale,
    )
    scored = f", scored on {summary['eval_task']}" if summary.get("eval_task") else ""
    print(f"{summary['task']}: {summary['shots']} shot(s), {summary['num_draws']} draw(s){scored}")
    for method, stats in summary["methods"].items():
        print(f"  {method:<8} Dice {stats['dice']['mean']:.4f} +- {stats['dice']['std']:.4f}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0

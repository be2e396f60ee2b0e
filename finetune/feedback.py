"""The `univg_gen` method: adapt the pretrained generator to the shots, let segmentation choose how to use
it, and make the run's synthetic set with that choice.

    pairs, fraction, selection = generator_synthetic_set(cfg, shots, names, draw_dir, generator_dir)

1. Adapt (finetune.generator.adapt_generator): LoRA (or full) on the shots, the task's modality in the
   generator's spare slot; snapshots at `generator.adapt.snapshot_steps` are candidates too.
2. Feedback (GenSeg's idea, as a search): every candidate (adaptation length x guidance scale x share of
   synthetic patches per batch) is scored by leave-one-out Dice: for held-out shot k, a short segmenter
   run on the other shots plus pairs that candidate draws for masks recombined from the other shots only,
   scored on shot k. "none" (the other shots alone, same steps) is scored beside them, so the log shows
   what the choice is worth, and (feedback.allow_real_only) wins when it beats every candidate: generated
   pairs that hurt the held-out shots are then not used. No gradient flows from the segmenter into the
   generator here: the choice is made between trained adapters, not by backpropagating through
   sampling (GenSeg's released code detaches the synthetic image, which makes its feedback a search of
   this kind as well). The generator was adapted on every shot, the held-out one included: its image,
   not its label, leaks into a fold.
3. Synthesis: `generator.num_pairs` masks from the data engine's recombination of all shots
   (`ShotSynthesizer.mask_sample`), images from the chosen candidate; shards + preview.png
   (mask | synthetic | the real shot the mask was grown on).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_engine.corpus import Sample
from finetune.config import FinetuneConfig, SegmenterConfig
from finetune.metrics import dice
from finetune.synthesis import RealShot, ShotSynthesizer, preview_samples

log = logging.getLogger(__name__)

SELECTION_FILE = "selection.json"


def _is_grey(shots: list[RealShot]) -> bool:
    return all(image.ndim == 2 for image, _m, _f in shots)


def _generated(
    pipeline: Any,
    slot: int,
    masks: list[tuple[np.ndarray, np.ndarray | None, str, dict[str, Any]]],
    guidance: float,
    seed: int,
    cfg: FinetuneConfig,
    grey: bool,
    progress: bool,
) -> list[np.ndarray]:
    from finetune.generator import synthesize_images

    steps = cfg.generator.num_inference_steps or None
    return synthesize_images(
        pipeline,
        slot,
        [m[0] for m in masks],
        [m[1] for m in masks],
        seeds=[seed + i for i in range(len(masks))],
        batch_size=cfg.generator.batch_size,
        num_inference_steps=steps,
        guidance_scale=guidance,
        grey=grey,
        progress=progress,
    )


def _short_segmenter(cfg: SegmenterConfig, steps: int, fraction: float) -> SegmenterConfig:
    optim = replace(cfg.optim, max_steps=steps, warmup_steps=min(cfg.optim.warmup_steps, steps // 4))
    return replace(
        cfg,
        optim=optim,
        patch=replace(cfg.patch, synthetic_fraction=fraction),
        log_every_steps=max(steps, 1),
    )


def _held_out_dice(segmenter: Any, shot: RealShot) -> float:
    image, mask, fov = shot
    pred = segmenter.predict(image) > 0
    label = mask > 0
    if fov is not None:
        pred, label = pred & (fov > 0), label & (fov > 0)
    return dice(pred, label)


def select_candidate(
    cfg: FinetuneConfig,
    shots: list[RealShot],
    names: list[str],
    adapters: list[tuple[int, Path]],
    progress: bool,
) -> dict[str, Any]:
    """Leave-one-out Dice of every candidate (module docstring); returns the selection record."""
    from finetune.generator import load_adapted_pipeline
    from finetune.segmenter import train_segmenter

    fb = cfg.generator.feedback
    candidates: list[dict[str, Any]] = [
        {"adapt_step": step, "adapter": str(folder), "guidance_scale": g, "synthetic_fraction": f}
        for step, folder in adapters
        for g in fb.guidance_scales
        for f in fb.synthetic_fractions
    ]
    record: dict[str, Any] = {"candidates": candidates, "folds": []}
    if not fb.enabled or len(shots) < 2 or len(candidates) == 1:
        why = "feedback off" if not fb.enabled else ("one candidate" if len(candidates) == 1 else "1 shot")
        record.update(chosen=candidates[-1], reason=f"no choice made ({why}): the last candidate")
        log.info("feedback: %s", record["reason"])
        return record
    grey = _is_grey(shots)
    started = time.perf_counter()
    num_folds = min(fb.num_folds, len(shots))
    scores = np.zeros((num_folds, len(candidates)))
    none_scores = np.zeros(num_folds)
    # one bar over every short training; their own log lines would bury the table, so they are quieted
    seg_log = logging.getLogger("finetune.segmenter")
    level = seg_log.level
    seg_log.setLevel(logging.WARNING)
    bar = tqdm(
        total=num_folds * (len(candidates) + 1),
        desc="feedback",
        unit="run",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for k in range(num_folds):
            rest = [s for i, s in enumerate(shots) if i != k]
            rest_names = [n for i, n in enumerate(names) if i != k]
            synth = ShotSynthesizer(
                rest, replace(cfg.synthesis, seed=cfg.synthesis.seed + 7919 * (k + 1)), rest_names
            )
            masks = [synth.mask_sample(i) for i in range(fb.num_pairs)]
            plain = train_segmenter(
                _short_segmenter(cfg.segmenter, fb.segmenter_steps, 0.0), rest, progress=False
            )
            none_scores[k] = _held_out_dice(plain, shots[k])
            bar.update(1)
            images_by: dict[tuple[str, float], list[np.ndarray]] = {}
            for c, cand in enumerate(candidates):
                key = (cand["adapter"], cand["guidance_scale"])
                if key not in images_by:
                    pipeline, slot = load_adapted_pipeline(cand["adapter"], device=_device())
                    images_by[key] = _generated(
                        pipeline, slot, masks, cand["guidance_scale"], 1000 * k, cfg, grey, progress=False
                    )
                pairs = [(img, m[0]) for img, m in zip(images_by[key], masks, strict=True)]
                seg_cfg = _short_segmenter(cfg.segmenter, fb.segmenter_steps, cand["synthetic_fraction"])
                segmenter = train_segmenter(seg_cfg, rest, synthetic=pairs, progress=False)
                scores[k, c] = _held_out_dice(segmenter, shots[k])
                bar.update(1)
            record["folds"].append(
                {"held_out": names[k], "none": none_scores[k], "candidates": scores[k].round(4).tolist()}
            )
    finally:
        bar.close()
        seg_log.setLevel(level)
    mean = scores.mean(axis=0)
    best = int(np.argmax(mean))
    chosen = candidates[best]
    real_only = fb.allow_real_only and float(none_scores.mean()) > float(mean[best])
    if real_only:
        chosen = {"adapt_step": None, "adapter": None, "guidance_scale": None, "synthetic_fraction": 0.0}
    record.update(
        chosen=chosen,
        loo_dice=mean.round(4).tolist(),
        loo_dice_none=float(none_scores.mean()),
        spread=float(mean.max() - mean.min()),
        reason="the shots alone beat every candidate" if real_only else "highest leave-one-out Dice",
        wall_s=round(time.perf_counter() - started, 1),
    )
    lines = [
        f"feedback: leave-one-out Dice over {num_folds} held-out shot(s), {fb.segmenter_steps} steps each",
        f"  {'adapt step':>10} {'guidance':>8} {'synthetic':>9} {'LOO Dice':>9}",
    ]
    for c, cand in enumerate(candidates):
        mark = "  <- chosen" if c == best and not real_only else ""
        lines.append(
            f"  {cand['adapt_step']:>10} {cand['guidance_scale']:>8.2f} {cand['synthetic_fraction']:>9.2f} "
            f"{mean[c]:>9.4f}{mark}"
        )
    lines.append(
        f"  {'none':>10} {'-':>8} {0.0:>9.2f} {none_scores.mean():>9.4f}  (the other shots alone)"
        f"{'  <- chosen' if real_only else ''} | best - worst candidate {record['spread']:+.4f}"
    )
    log.info("\n".join(lines))
    return record


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def generator_synthetic_set(
    cfg: FinetuneConfig,
    shots: list[RealShot],
    names: list[str],
    folder: Path,
    generator_dir: Path,
    draw: int,
    progress: bool,
) -> tuple[Path | None, float, dict[str, Any]]:
    """Adapt -> select -> synthesize into folder (adapter/, selection.json, synthetic/); each part is kept
    when already complete. Returns (synthetic shard folder, chosen synthetic fraction, selection record);
    the folder is None when the feedback chose the shots alone."""
    from finetune.generator import adapt_generator, load_adapted_pipeline, read_adapt_record, snapshot_dirs
    from shards.ingest import write_samples

    adapter = folder / "adapter"
    try:
        read_adapt_record(adapter)
        log.info("draw %d: adapter %s complete already", draw, adapter)
    except ValueError:
        started = time.perf_counter()
        adapt_cfg = replace(cfg.generator.adapt, seed=cfg.generator.adapt.seed + draw)
        adapt_generator(generator_dir, shots, adapt_cfg, adapter, progress=progress, overwrite=True)
        log.info("draw %d: generator adapted in %.0f s -> %s", draw, time.perf_counter() - started, adapter)
    selection_path = folder / SELECTION_FILE
    if selection_path.is_file():
        selection = json.loads(selection_path.read_text())
    else:
        selection = select_candidate(cfg, shots, names, snapshot_dirs(adapter), progress)
        tmp = selection_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(selection, indent=2) + "\n")
        tmp.replace(selection_path)
    chosen = selection["chosen"]
    out = folder / "synthetic"
    if chosen["adapter"] is None:  # the feedback chose the shots alone
        log.info("draw %d: feedback chose the shots alone: no generated pairs are used", draw)
        return None, 0.0, selection
    syn_cfg = replace(cfg.synthesis, seed=cfg.synthesis.seed + 1000 * draw)
    config = {"chosen": chosen, "num_pairs": cfg.generator.num_pairs, "synthesis_seed": syn_cfg.seed}
    if not (out / "manifest.json").is_file() or json.loads((out / "manifest.json").read_text())["config"] != {
        "generator": config
    }:
        started = time.perf_counter()
        synth = ShotSynthesizer(shots, syn_cfg, names)
        masks = [synth.mask_sample(i) for i in range(cfg.generator.num_pairs)]
        pipeline, slot = load_adapted_pipeline(chosen["adapter"], device=_device())
        images = _generated(
            pipeline,
            slot,
            masks,
            chosen["guidance_scale"],
            10_000 * (draw + 1),
            cfg,
            _is_grey(shots),
            progress,
        )
        samples = [
            Sample(
                image=img,
                mask=m[0],
                fov=m[1],
                meta={
                    "modality": "task",
                    "source": "synthetic",
                    "route": "generator",
                    "host": m[2],
                    "index": i,
                    "params": m[3],
                    "adapter": chosen["adapter"],
                    "guidance_scale": chosen["guidance_scale"],
                },
            )
            for i, (img, m) in enumerate(zip(images, masks, strict=True))
        ]
        write_samples(
            samples,
            num_samples=len(samples),
            name="generated",
            out=out,
            config={"generator": config},
            modality="task",
            samples_per_shard=cfg.synthesis.samples_per_shard,
            png_compression=cfg.synthesis.png_compression,
            overwrite=True,
            progress=progress,
            desc="write generated",
        )
        preview_samples(
            samples[:6], dict(zip(names, [s[0] for s in shots], strict=True)), out / "preview.png"
        )
        log.info(
            "draw %d: %d generated pairs (adapter step %d, guidance %.2f) in %.0f s; preview %s",
            draw,
            len(samples),
            chosen["adapt_step"],
            chosen["guidance_scale"],
            time.perf_counter() - started,
            out / "preview.png",
        )
    return out, float(chosen["synthetic_fraction"]), selection

"""Few-shot adaptation of the pretrained generator to a task's modality, and synthesis with it.

    base = "runs/pretrain/checkpoints/step_0100000/generator"
    out = adapt_generator(base, shots, AdaptConfig(), run / "generator_adapter")
    pipe, modality = load_adapted_pipeline(out, device="cuda")
    images = synthesize_images(pipe, modality, masks, None, seeds=range(len(masks)), batch_size=16)

`shots` are (image, mask, fov or None) as `data_engine.ingest.load_case` gives them: image uint8 HxW or
HxWx3 BGR, mask uint8 HxW {0, 255}, fov uint8 HxW {0, 255}. The real images are larger than the
generator's side (`image_size_px`): each training example is a random square crop of about
`crop_side_px` real pixels (the corpus' image side, so the vessels shrink to the widths the generator
learned when it saw whole corpus images at its own side), resized to the generator's side, flipped and
turned by multiples of 90 degrees.

Methods. "lora" (the default) freezes the UNet and trains low-rank adapters (peft LoRA) on the attention
projections and the ResNet convolutions plus the class embedding: a new modality lives in the spare slot's
row of that embedding, which pretraining never trained, so it starts as the mean of the trained rows.
AdamW runs without weight decay, so the rows of modalities absent from the shots get no update and stay
bit-identical. "full" trains every weight and writes a complete generator folder.

Adapter folder (`out_dir`):
  adapt.json             config, base generator (path, sha256, info), modality slot, steps, losses, wall time
  adapt.log              the run's log lines
  adapter_config.json    "lora": a peft adapter (LoRA weights + the trained class embedding), which
  adapter_model.safetensors   stock peft loads too:
                         PeftModel.from_pretrained(UNet2DModel.from_pretrained(base), out_dir)
  generator/             "full": a generator folder (plain diffusers UNet2DModel + univg_generator.json)
diffusers' LoRA loaders (`load_lora_adapter`, `PeftAdapterMixin`) cover UNet2DConditionModel and the
transformers, not UNet2DModel, so the adapter is peft's own format, loaded by `load_adapted_pipeline`.

Tensor legend: B batch, H/W pixels (the generator's side); `x0_B3HW` clean image in [-1, 1], `noise_B3HW`,
`noisy_B3HW`, `mask_B1HW` / `fov_B1HW` in {0, 1}, `keep_B` 1 where the mask is kept (0: dropped, as
pretraining did for guidance), `modality_B` int64, `t_B` int64 timesteps, `pred_B3HW` UNet output,
`target_B3HW` what it should be.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from finetune.config import NEW_MODALITY, AdaptConfig
from pretrain.model import (
    GENERATOR_INFO,
    GeneratorInfo,
    count_parameters,
    diffusion_target,
    load_generator,
    read_generator_info,
    save_generator,
    unet_input,
)
from pretrain.pipeline import VesselPipeline
from pretrain.train import eval_loss, peak_memory_gib
from univg.config import to_dict

log = logging.getLogger(__name__)

FORMAT = "univg-adapter/1"
ADAPT_JSON = "adapt.json"
SNAPSHOTS_DIR = "snapshots"  # adapters saved part-way (AdaptConfig.snapshot_steps)
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names (PeftModel.save_pretrained)
ADAPTER_CONFIG = "adapter_config.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' file name in a generator folder
MAX_CROP_TRIES = 8  # crops drawn per example before the one with most vessel is kept (count)
EVAL_CROPS_PER_SHOT = 2  # fixed crops per shot in the before/after loss batch (count)
MAX_EVAL_EXAMPLES = 16  # cap on that batch (count)

# --- shots -> checked arrays -> augmented training batches ---

Shot = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # (image, mask, fov or None), as load_case gives


def _checked_shots(shots: Sequence[Shot], size_px: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image HxWx3 RGB, mask {0,255}, fov {0,255}) per shot; ValueError naming the bad shot."""
    if len(shots) == 0:
        raise ValueError("shots is empty: adapting the generator needs at least one real image-mask pair")
    out = []
    for i, shot in enumerate(shots):
        if len(shot) != 3:
            raise ValueError(f"shots[{i}] must be (image, mask, fov or None), got {len(shot)} items")
        image, mask, fov = shot
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(f"shots[{i}] image must be uint8 HxW or HxWx3, got {image.dtype} {image.shape}")
        if mask.dtype != np.uint8 or mask.shape != image.shape[:2]:
            raise ValueError(
                f"shots[{i}] mask must be uint8 of the image's size {image.shape[:2]}, "
                f"got {mask.dtype} {mask.shape}"
            )
        if not mask.any():
            raise ValueError(
                f"shots[{i}] mask is empty (no vessel pixel): every shot needs a labelled vessel"
            )
        if fov is not None and (fov.dtype != np.uint8 or fov.shape != mask.shape):
            raise ValueError(
                f"shots[{i}] fov must be uint8 of the mask's size {mask.shape}, got {fov.dtype} {fov.shape}"
            )
        h, w = mask.shape
        if min(h, w) < size_px:
            raise ValueError(
                f"shots[{i}] is {w}x{h} px: the generator makes {size_px}x{size_px} px images, so no "
                f"{size_px} px crop fits; use shots at least {size_px} px on each side (upsampling would "
                "change the vessel widths the generator learned) or a generator of a smaller image_size_px"
            )
        # BGR (OpenCV's order, as load_case gives) -> RGB, the generator's channel order
        rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB if image.ndim == 2 else cv2.COLOR_BGR2RGB)
        binary = np.where(mask > 0, np.uint8(255), np.uint8(0))
        fov_255 = np.full_like(binary, 255) if fov is None else np.where(fov > 0, np.uint8(255), np.uint8(0))
        out.append((rgb, binary, fov_255))
    return out


def _resize(array: np.ndarray, height: int, width: int, binary: bool) -> np.ndarray:
    """Area averaging when shrinking (thin vessels survive as partial values), linear when growing;
    binary arrays are thresholded at half back to {0, 255}."""
    if array.shape[:2] == (height, width):
        return array
    shrink = height * width < array.shape[0] * array.shape[1]
    out = cv2.resize(array, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if binary:
        out = np.where(out >= 128, np.uint8(255), np.uint8(0))
    return out


def _binary_at(array: np.ndarray | None, height: int, width: int) -> np.ndarray:
    """A mask or FOV (any non-zero = in) as {0, 255} at height x width; None -> all in."""
    if array is None:
        return np.full((height, width), 255, np.uint8)
    return _resize(np.where(array > 0, np.uint8(255), np.uint8(0)), height, width, binary=True)


def _random_crop(
    shot: tuple[np.ndarray, np.ndarray, np.ndarray], size_px: int, cfg: AdaptConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One augmented example at the generator's side: square crop of ~crop_side_px, resize, flips, turn."""
    image, mask, fov = shot
    h, w = mask.shape
    best: tuple[float, int, int, int] = (-1.0, 0, 0, min(h, w))
    for _ in range(MAX_CROP_TRIES):
        side = round(cfg.crop_side_px * rng.uniform(*cfg.crop_scale_range))
        side = int(np.clip(side, size_px, min(h, w)))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        fraction = float(np.count_nonzero(mask[y : y + side, x : x + side])) / side**2
        if fraction > best[0]:
            best = (fraction, y, x, side)
        if fraction >= cfg.min_vessel_fraction:
            break
    _, y, x, side = best
    arrays = [
        _resize(image[y : y + side, x : x + side], size_px, size_px, binary=False),
        _resize(mask[y : y + side, x : x + side], size_px, size_px, binary=True),
        _resize(fov[y : y + side, x : x + side], size_px, size_px, binary=True),
    ]
    if cfg.flip and rng.random() < 0.5:
        arrays = [a[:, ::-1] for a in arrays]
    if cfg.flip and rng.random() < 0.5:
        arrays = [a[::-1] for a in arrays]
    k = int(rng.integers(4)) if cfg.rot90 else 0
    image_c, mask_c, fov_c = (np.ascontiguousarray(np.rot90(a, k)) for a in arrays)
    return image_c, mask_c, fov_c


def _batch(
    shots: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    picks: Sequence[int],
    size_px: int,
    cfg: AdaptConfig,
    rng: np.random.Generator,
    modality: int,
) -> dict[str, torch.Tensor]:
    """Augmented crops of shots[picks] as the pretraining reader gives them (image [-1, 1], masks {0, 1})."""
    crops = [_random_crop(shots[j], size_px, cfg, rng) for j in picks]
    image = np.stack([c[0] for c in crops]).transpose(0, 3, 1, 2).astype(np.float32)
    return {
        "image": torch.from_numpy(image * (2.0 / 255.0) - 1.0),
        "mask": torch.from_numpy(np.stack([c[1] for c in crops])[:, None].astype(np.float32) / 255.0),
        "fov": torch.from_numpy(np.stack([c[2] for c in crops])[:, None].astype(np.float32) / 255.0),
        "modality": torch.full((len(crops),), modality, dtype=torch.int64),
    }


# --- the generator, wrapped for training ---


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_generator_dir(generator_dir: Path, what: str) -> GeneratorInfo:
    """The generator folder's info; ValueError naming `what` (the argument) if it is not one."""
    if not generator_dir.is_dir():
        raise ValueError(
            f"{what}={str(generator_dir)!r}: no such folder (expected a generator folder, "
            "e.g. runs/pretrain/checkpoints/step_0100000/generator)"
        )
    if not (generator_dir / GENERATOR_INFO).is_file() and (generator_dir / "generator").is_dir():
        raise ValueError(
            f"{what}={str(generator_dir)!r} is a checkpoint folder: pass {generator_dir / 'generator'}"
        )
    try:
        info = read_generator_info(generator_dir)
    except ValueError as e:
        raise ValueError(f"{what}={str(generator_dir)!r}: {e}") from e
    if not (generator_dir / UNET_WEIGHTS).is_file():
        raise ValueError(
            f"{what}={str(generator_dir)!r} is not a generator folder: {UNET_WEIGHTS} is missing"
        )
    return info


def modality_slot(modality: str, info: GeneratorInfo) -> int:
    """Class-embedding index of `modality` in a generator: its built-in index, or the spare slot for 'new'."""
    if modality == NEW_MODALITY:
        return len(info.modalities)
    if modality not in info.modalities:
        raise ValueError(
            f"adapt.modality={modality!r} is not one of the generator's modalities "
            f"{list(info.modalities)}: name one of them, or 'new' for the spare slot"
        )
    return info.modalities.index(modality)


def _resolve_mixed_precision(setting: str) -> str:
    cuda = torch.cuda.is_available()
    if setting == "auto":
        if not cuda:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "fp16" and not cuda:
        raise ValueError("adapt.mixed_precision='fp16' needs CUDA: use 'no' or 'auto' on a CPU")
    return setting


def _lora_config(cfg: AdaptConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=["class_embedding"] if cfg.train_class_embedding else None,
        init_lora_weights=True,  # B = 0: the adapted generator starts exactly at the base
    )


def _accelerator(mixed: str) -> Any:
    """An Accelerator with `mixed` precision. accelerate holds one precision per process and refuses a
    second, so after a stage that chose another one (the segmenter, say) its state starts afresh; the
    process group (accelerate's PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed) != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"out_dir {out_dir} exists and is not empty: pass overwrite=True or another folder"
            )
        if not (out_dir / ADAPT_JSON).is_file():
            raise ValueError(
                f"overwrite: {out_dir} is not an adapter folder (no {ADAPT_JSON}), so it is not deleted"
            )
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


# --- the run ---


def adapt_generator(
    generator_dir: str | Path,
    shots: Sequence[Shot],
    cfg: AdaptConfig,
    out_dir: str | Path,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Adapt a pretrained generator to the shots' modality (LoRA or full fine-tuning); returns out_dir.
    See the module doc for the folder it writes. Raises ValueError for a bad generator folder or shots,
    FloatingPointError (after writing adapt.json) when the loss goes non-finite."""
    generator_dir, out_dir = Path(generator_dir), Path(out_dir)
    info = _check_generator_dir(generator_dir, "generator_dir")
    size_px = info.model.image_size_px
    checked = _checked_shots(shots, size_px)
    slot = modality_slot(cfg.modality, info)
    mixed = _resolve_mixed_precision(cfg.mixed_precision)
    _prepare_out_dir(out_dir, overwrite)
    handler = logging.FileHandler(out_dir / "adapt.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    record: dict[str, Any] = {
        "format": FORMAT,
        "status": "running",
        "config": to_dict(cfg),
        "base_generator": str(generator_dir.resolve()),
        "base_sha256": _sha256(generator_dir / UNET_WEIGHTS),
        "base_info": info.to_dict(),
        "modality": cfg.modality,
        "modality_index": slot,
        "num_shots": len(checked),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(out_dir / ADAPT_JSON, record)  # the resolved config first, as every training command does
    started = time.perf_counter()
    try:
        return _adapt(generator_dir, checked, cfg, out_dir, info, slot, mixed, record, progress)
    finally:
        record["wall_s"] = round(time.perf_counter() - started, 2)
        _write_json(out_dir / ADAPT_JSON, record)
        log.removeHandler(handler)
        handler.close()


def _adapt(
    generator_dir: Path,
    shots: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    cfg: AdaptConfig,
    out_dir: Path,
    info: GeneratorInfo,
    slot: int,
    mixed: str,
    record: dict[str, Any],
    progress: bool,
) -> Path:
    """The run of adapt_generator, in order: model -> optimizer -> the loop -> save; fills `record`."""
    record["status"] = "failed"  # until the loop finishes
    accelerator = _accelerator(mixed)
    device = accelerator.device
    size_px = info.model.image_size_px
    unet: Any
    noise_scheduler: Any
    unet, noise_scheduler, _ = load_generator(generator_dir, "cpu")
    trains_embedding = cfg.method == "full" or cfg.train_class_embedding
    if slot == len(info.modalities) and cfg.init_new_from_mean and trains_embedding:
        with torch.no_grad():  # the spare row never saw data: start it at the trained modalities' centre
            weight = unet.class_embedding.weight
            weight[slot] = weight[: len(info.modalities)].mean(dim=0)

    torch.manual_seed(cfg.seed)  # LoRA init and UNet dropout
    model: Any
    if cfg.method == "lora":
        from peft import get_peft_model

        model = get_peft_model(unet, _lora_config(cfg))
    else:
        model = unet.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    num_trainable = sum(p.numel() for p in trainable)
    # No weight decay: an embedding row that gets no gradient then gets no update either (Adam's step is 0)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    p_drop, num_t = info.diffusion.mask_dropout_prob, info.diffusion.num_train_timesteps

    # a fixed batch (crops, timesteps, noise) scored before and after: comparable numbers
    num_eval = min(MAX_EVAL_EXAMPLES, EVAL_CROPS_PER_SHOT * len(shots))
    eval_batch = _batch(
        shots,
        [i % len(shots) for i in range(num_eval)],
        size_px,
        cfg,
        np.random.default_rng([cfg.seed, 1]),
        slot,
    )
    model.eval()
    loss_start = eval_loss(model, noise_scheduler, eval_batch, cfg.seed)
    model.train()
    log.info(
        "adapt generator %s -> %s | %s | modality %s (slot %d) | %d shots | %d px | "
        "trainable %.3fM of %.2fM | %d steps x batch %d | lr %.1e | %s | mixed precision %s | "
        "fixed-batch loss %.4f",
        generator_dir,
        out_dir,
        cfg.method,
        cfg.modality,
        slot,
        len(shots),
        size_px,
        num_trainable / 1e6,
        count_parameters(model) / 1e6,
        cfg.max_steps,
        cfg.batch_size,
        cfg.lr,
        device,
        mixed,
        loss_start,
    )

    step, losses, interval_losses = 0, list[float](), list[float]()
    interval_start = time.perf_counter()
    rng = np.random.default_rng([cfg.seed, 0])
    bar = tqdm(
        total=cfg.max_steps,
        desc=f"adapt generator ({cfg.method})",
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
    )
    with logging_redirect_tqdm():
        while step < cfg.max_steps:
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            # augmented crops of the shots
            picks = rng.integers(0, len(shots), cfg.batch_size)
            batch = _batch(shots, picks.tolist(), size_px, cfg, rng, slot)
            x0_B3HW = batch["image"].to(device)
            mask_B1HW, fov_B1HW = batch["mask"].to(device), batch["fov"].to(device)
            modality_B = batch["modality"].to(device)
            b = x0_B3HW.shape[0]
            # sample t and noise -> add noise (mask dropout as in pretraining, so guidance keeps working)
            t_B = torch.randint(0, num_t, (b,), generator=noise_gen, device=device)
            noise_B3HW = torch.randn(x0_B3HW.shape, generator=noise_gen, device=device)
            keep_B = (torch.rand(b, generator=noise_gen, device=device) >= p_drop).float()
            noisy_B3HW = noise_scheduler.add_noise(x0_B3HW, noise_B3HW, t_B)
            # forward with mask and modality -> loss (epsilon or v, as the generator was trained)
            x_in = unet_input(noisy_B3HW, mask_B1HW * keep_B[:, None, None, None], fov_B1HW)
            pred_B3HW = model(x_in, t_B, class_labels=modality_B).sample
            target_B3HW = diffusion_target(noise_scheduler, x0_B3HW, noise_B3HW, t_B)
            loss = F.mse_loss(pred_B3HW.float(), target_B3HW.float())
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                record.update(
                    status="diverged",
                    step=step,
                    loss_history=losses,
                    error=f"non-finite loss {loss_value} at step {step + 1}",
                )
                log.error("stopping: %s (lower adapt.lr?)", record["error"])
                raise FloatingPointError(f"{record['error']}: stopping (lower adapt.lr?)")
            # backward -> clip -> step
            accelerator.backward(loss)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            gnorm = float(accelerator.clip_grad_norm_(trainable, max_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss_value)
            interval_losses.append(loss_value)
            if step in cfg.snapshot_steps and step < cfg.max_steps:
                snap = out_dir / SNAPSHOTS_DIR / f"step_{step:06d}"
                model.eval()
                _save_adapter(accelerator.unwrap_model(model), noise_scheduler, info, step, cfg, snap)
                model.train()
                _write_json(snap / ADAPT_JSON, {**record, "status": "completed", "step": step})
                log.info("snapshot after step %d -> %s", step, snap)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            # log
            if step % cfg.log_every_steps == 0 or step == cfg.max_steps:
                ms = 1000 * (time.perf_counter() - interval_start) / len(interval_losses)
                log.info(
                    "step %06d/%06d | loss %.4f | lr %.1e | gnorm %.2f | %.0f ms/step | %.0f img/s | "
                    "mem %.1f GiB",
                    step,
                    cfg.max_steps,
                    float(np.mean(interval_losses)),
                    lr,
                    gnorm,
                    ms,
                    1000 * b / ms,
                    peak_memory_gib(device.type),
                )
                interval_losses, interval_start = [], time.perf_counter()
    bar.close()

    trained: Any = accelerator.unwrap_model(model)
    trained.eval()
    loss_end = eval_loss(trained, noise_scheduler, eval_batch, cfg.seed)
    log.info("fixed-batch loss %.4f -> %.4f", loss_start, loss_end)
    _save_adapter(trained, noise_scheduler, info, step, cfg, out_dir)
    record.update(
        status="completed",
        step=step,
        num_trainable_params=num_trainable,
        fixed_batch_loss={"start": loss_start, "end": loss_end},
        loss_history=[round(v, 6) for v in losses],
        final_loss=losses[-1],
        device=str(device),
        mixed_precision=mixed,
    )
    log.info("adapter -> %s", out_dir)
    return out_dir


def _save_adapter(
    trained: Any, noise_scheduler: Any, info: GeneratorInfo, step: int, cfg: AdaptConfig, folder: Path
) -> None:
    """The adapter ("lora": peft's files) or the whole generator ("full") after `step` steps, into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.method == "lora":
        trained.save_pretrained(str(folder), safe_serialization=True)
        (folder / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    else:
        save_generator(
            trained, noise_scheduler, folder / "generator", dataclasses.replace(info, step=info.step + step)
        )


def snapshot_dirs(adapter_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every adapter the adaptation saved, the snapshots and the final one, by step."""
    adapter_dir = Path(adapter_dir)
    found = [(int(read_adapt_record(adapter_dir)["step"]), adapter_dir)]
    for snap in sorted((adapter_dir / SNAPSHOTS_DIR).glob("step_*")):
        found.append((int(read_adapt_record(snap)["step"]), snap))
    return sorted(found)


# --- loading and sampling ---


def read_adapt_record(adapter_dir: str | Path) -> dict[str, Any]:
    """adapt.json of an adapter folder; ValueError naming the folder if it is not a completed one."""
    path = Path(adapter_dir) / ADAPT_JSON
    if not path.is_file():
        raise ValueError(
            f"adapter_dir={str(adapter_dir)!r} is not an adapter folder: {ADAPT_JSON} is missing"
        )
    record: dict[str, Any] = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{path}: format {record.get('format')!r}, expected {FORMAT!r}")
    if record.get("status") != "completed":
        raise ValueError(f"{path}: the adaptation did not complete (status {record.get('status')!r})")
    return record


def load_adapted_unet(
    adapter_dir: str | Path,
    device: str | torch.device = "cpu",
    merge: bool = True,
    generator_dir: str | Path | None = None,
) -> tuple[Any, Any, GeneratorInfo, dict[str, Any]]:
    """(UNet, noise scheduler, generator info, adapt.json) of an adapter folder: the base generator with the
    LoRA adapter (merged into the weights when `merge`, else a peft model), or the full generator folder.
    `generator_dir` overrides the base path recorded in adapt.json (a moved base); its sha256 must match."""
    adapter_dir = Path(adapter_dir)
    record = read_adapt_record(adapter_dir)
    unet: Any
    if record["config"]["method"] == "full":
        unet, scheduler, info = load_generator(adapter_dir / "generator", device)
        return unet, scheduler, info, record
    base = Path(generator_dir) if generator_dir is not None else Path(record["base_generator"])
    what = (
        "generator_dir" if generator_dir is not None else f"base generator (from {adapter_dir / ADAPT_JSON})"
    )
    _check_generator_dir(base, what)
    if _sha256(base / UNET_WEIGHTS) != record["base_sha256"]:
        raise ValueError(
            f"{what}={str(base)!r} holds other weights than the base the adapter was trained on "
            f"(sha256 of {UNET_WEIGHTS} differs): pass the original base as generator_dir"
        )
    from peft import PeftModel

    unet, scheduler, info = load_generator(base, "cpu")
    model: Any = PeftModel.from_pretrained(unet, str(adapter_dir), is_trainable=False)
    if merge:  # one plain UNet again: sampling pays nothing for the adapter
        model = model.merge_and_unload()
    return model.to(device).eval(), scheduler, info, record


def load_adapted_pipeline(
    adapter_dir: str | Path, device: str | torch.device = "cpu", generator_dir: str | Path | None = None
) -> tuple[VesselPipeline, int]:
    """(VesselPipeline of the adapted generator, its modality index) ready to sample; LoRA is merged."""
    unet, scheduler, info, record = load_adapted_unet(adapter_dir, device, True, generator_dir)
    s = info.sampling
    return VesselPipeline(unet, scheduler, s.sampler, s.num_inference_steps, s.guidance_scale), int(
        record["modality_index"]
    )


def synthesize_images(
    pipeline: VesselPipeline,
    modality_index: int,
    masks: Sequence[np.ndarray],
    fovs: Sequence[np.ndarray | None] | None,
    seeds: Sequence[int],
    batch_size: int,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    grey: bool = False,
    progress: bool = True,
) -> list[np.ndarray]:
    """One uint8 image per mask, at the mask's size: HxWx3 BGR (OpenCV's order, as the rest of univg holds
    colour), or HxW (the mean of the channels) when `grey`.

    Each mask (uint8 {0, 255}, any size) is resized to the generator's square side (area averaging, then
    thresholded at half), generated with its own seed, and the image resized back to the mask's size. A
    generator smaller than the mask therefore gives a blurrier image than the mask is sharp, and a
    non-square mask is squeezed to a square and stretched back."""
    n = len(masks)
    if len(seeds) != n:
        raise ValueError(f"seeds has {len(seeds)} entries for {n} masks: give one seed per mask")
    if fovs is not None and len(fovs) != n:
        raise ValueError(
            f"fovs has {len(fovs)} entries for {n} masks: give one (or None) per mask, or fovs=None"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    for i, mask in enumerate(masks):
        if mask.dtype != np.uint8 or mask.ndim != 2:
            raise ValueError(f"masks[{i}] must be uint8 HxW {{0, 255}}, got {mask.dtype} {mask.shape}")
        fov = None if fovs is None else fovs[i]
        if fov is not None and (fov.dtype != np.uint8 or fov.shape != mask.shape):
            raise ValueError(
                f"fovs[{i}] must be uint8 of masks[{i}]'s size {mask.shape}, got {fov.dtype} {fov.shape}"
            )
    size = pipeline.unet.config.sample_size
    side_h, side_w = (size, size) if isinstance(size, int) else tuple(size)
    out: list[np.ndarray] = []
    with tqdm(total=n, desc="synthesize images", disable=not progress, unit="img", dynamic_ncols=True) as bar:
        for start in range(0, n, batch_size):
            idx = range(start, min(n, start + batch_size))
            small = [_binary_at(masks[i], side_h, side_w) for i in idx]
            fov_small = [_binary_at(None if fovs is None else fovs[i], side_h, side_w) for i in idx]
            mask_B1HW = torch.from_numpy(np.stack(small)[:, None].astype(np.float32) / 255.0)
            fov_B1HW = torch.from_numpy(np.stack(fov_small)[:, None].astype(np.float32) / 255.0)
            image_B3HW = pipeline(
                mask_B1HW,
                [modality_index] * len(idx),
                seeds=[int(seeds[i]) for i in idx],
                fov_B1HW=fov_B1HW,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            )
            rgb_BHW3 = ((image_B3HW.cpu().float().permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255)
            for j, i in enumerate(idx):
                rgb = rgb_BHW3[j].to(torch.uint8).numpy()
                h, w = masks[i].shape
                if grey:
                    image = rgb.astype(np.float32).mean(axis=2).round().astype(np.uint8)
                else:
                    image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
                out.append(_resize(image, h, w, binary=False))
            bar.update(len(idx))
    return out

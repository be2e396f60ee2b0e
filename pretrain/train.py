"""Pretrain the mask- and modality-conditioned diffusion generator on a shard corpus, with DeepSpeed.

    univg pretrain --config configs/pretrain/tiny.yaml                    # one process (gloo/NCCL group of 1)
    torchrun --nproc_per_node 2 -m pretrain --config ...        # or: deepspeed --module pretrain ...

Order of a run: check everything that can be wrong with the input (config, batch split, SD folder,
run folder, resume checkpoint, shards) -> process group -> run folder (resolved config first) -> model,
EMA, AdamW, LR schedule -> deepspeed.initialize -> resume -> the loop (`train()`, one screen) -> summary.json.

Two generators (model.kind), one loop. `unet`: the pixel-space UNet2DModel (model.py) is the whole model.
`controlnet`: UniVG's recipe (controlnet.py). Only its trained part, the ControlNet + modality tokens
(`ControlNetBranch`), goes to deepspeed.initialize, the optimizer and the EMA; the frozen SD VAE and UNet
(`sd` below; None for kind unet) sit on the device beside it, in bf16 on GPU, outside ZeRO. The diffusion
then runs on the VAE's scaled latents with SD's own DDPM schedule. The kind-specific steps are the small
functions under "the generator, by model.kind": build, what the diffusion runs on, predict, sample, save.

Data position. Training is cut into segments that start at step 0 and at every checkpoint. A segment
starting at step S reads a fresh resampled shard stream seeded by (train.seed, S, rank, worker) and draws
noise, timesteps and mask dropout from a generator seeded by (train.seed, rank, S). A run resumed from
checkpoint S therefore sees exactly the data and noise the uninterrupted run saw after S, without
replaying the stream; meta.json records S as the data position.

Tensor legend: B micro batch, H/W pixels; `image_B3HW` clean image in [-1, 1]; `x0_BCHW` what the
diffusion runs on: the image itself (unet, C = 3) or its scaled VAE latents (controlnet, C = 4, H/8 x W/8);
`noise_BCHW`, `noisy_BCHW`, `mask_B1HW` / `fov_B1HW` in {0, 1} at image resolution, `keep_B` 1 where the
mask is kept (0: dropped for guidance), `modality_B` int64, `t_B` int64 timesteps, `pred_BCHW` the model's
output, `target_BCHW` what it should be.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import resource
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

import univg
from data_engine import MODALITIES
from pretrain.checkpoint import (
    UNET_WEIGHT_FILES,
    complete_checkpoints,
    load_checkpoint,
    manifest_hash,
    newest_checkpoint,
    read_meta,
    save_checkpoint,
    temp_folders,
    write_json,
)
from pretrain.config import Derived, ModelConfig, PretrainConfig, check_sd_folder, deepspeed_config, derive
from pretrain.model import (
    NUM_MODALITY_SLOTS,
    GeneratorInfo,
    build_noise_scheduler,
    build_unet,
    config_differences,
    count_parameters,
    diffusion_target,
    save_generator,
    unet_input,
)
from univg.config import config_hash, to_dict

if TYPE_CHECKING:  # controlnet.py is imported only when model.kind is controlnet
    from pretrain.controlnet import ControlNetGenerator

log = logging.getLogger("univg.pretrain")
# DeepSpeed's ZeRO collectives call torch names deprecated in 2.13, warning once per call: not ours to fix
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


# --- checks that run before anything is started or written ---


def launch_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) set by torchrun or the deepspeed launcher, else (0, 0, 1)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return rank, int(os.environ.get("LOCAL_RANK", rank)), world
    return 0, 0, 1


def plan_run_folder(
    cfg: PretrainConfig, derived: Derived, resume: str | None, overwrite: bool
) -> tuple[Path | None, dict[str, Any] | None]:
    """Decide what happens to the run folder; returns (checkpoint to resume, its meta) or (None, None).
    Raises FileExistsError / ValueError for a run that must not be touched or cannot be resumed."""
    run = Path(cfg.out)
    if resume is not None and overwrite:
        raise ValueError("--overwrite deletes the checkpoints that --resume would continue: give one of them")
    ckpt: Path | None = None
    if resume == "auto":
        ckpt = newest_checkpoint(run)
    elif resume is not None:
        ckpt = Path(resume)
        if not (ckpt / "meta.json").is_file():
            raise ValueError(f"--resume {resume}: not a complete checkpoint folder (no meta.json)")
    exists = run.is_dir() and any(run.iterdir())
    if exists and overwrite and not (run / "config.yaml").is_file():
        raise ValueError(f"--overwrite: {run} is not a run folder (no config.yaml), so it is not deleted")
    inside = ckpt is not None and run.resolve() in ckpt.resolve().parents
    if exists and not overwrite and resume != "auto" and not inside:
        raise FileExistsError(
            f"run folder {run} exists: pass --overwrite to replace it, --resume auto to continue it, "
            "or choose another --out"
        )
    if ckpt is None:
        return None, None
    meta = read_meta(ckpt)
    check_resumable(meta, cfg, derived, ckpt)
    return ckpt, meta


def check_resumable(meta: dict[str, Any], cfg: PretrainConfig, derived: Derived, ckpt: Path) -> None:
    """ValueError unless checkpoint `meta` fits this config and launch (generator kind and config, SD
    folder, world size, ZeRO, bf16)."""
    saved = meta["config"]
    # a field the checkpoint predates has its default (model.kind: a checkpoint older than it is a UNet)
    saved_model = {**to_dict(ModelConfig()), **saved.get("model", {})}
    diffs = config_differences(saved_model, to_dict(cfg.model), "model.")
    diffs += config_differences(saved.get("diffusion", {}), to_dict(cfg.diffusion), "diffusion.")
    if diffs:
        raise ValueError(
            f"checkpoint {ckpt} holds a generator of another config ({'; '.join(diffs)}; checkpoint vs now): "
            "resume with the config it was trained with, or start a new run folder"
        )
    was = meta.get("derived", {})
    for key, now in (
        ("world_size", derived.world_size),
        ("zero_stage", derived.zero_stage),
        ("bf16", derived.bf16),
    ):
        if key in was and was[key] != now:
            raise ValueError(
                f"checkpoint {ckpt} was written with {key}={was[key]} but this launch has {key}={now}: "
                f"DeepSpeed state and the data position need the same {key}; relaunch with it"
            )


def check_shards(cfg: PretrainConfig, hash_files: bool) -> tuple[list[str], str]:
    """Shard URLs and the manifest hash; ValueError if the manifest is missing or a shard is missing,
    of the wrong size, or (when `hash_files`) of the wrong sha256."""
    import hashlib

    from shards.manifest import load_manifest
    from shards.reader import shard_urls

    folder = Path(cfg.data.shards)
    try:
        manifest = load_manifest(folder)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"data.shards={cfg.data.shards!r}: {e} (build it with `univg shards build`)") from e
    if manifest.num_samples < 1:
        raise ValueError(f"data.shards={cfg.data.shards!r}: the manifest lists no samples")
    for record in manifest.shards:
        path = folder / record.name
        if not path.is_file():
            raise ValueError(f"data.shards: shard {path} is missing; run `univg shards verify {folder}`")
        if path.stat().st_size != record.num_bytes:
            raise ValueError(
                f"data.shards: shard {path} has {path.stat().st_size} bytes, the manifest says "
                f"{record.num_bytes}; run `univg shards verify {folder}`"
            )
        if hash_files:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            if digest.hexdigest() != record.sha256:
                raise ValueError(
                    f"data.shards: shard {path} fails its manifest sha256; run "
                    f"`univg shards verify {folder}` and rebuild it"
                )
    return shard_urls(folder), manifest_hash(folder)


# --- process group, logging, run folder ---


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


STALE_LOCK_S = 600.0  # a torch extension lock older than this is taken for one a killed compile left


def stale_extension_locks(max_age_s: float = STALE_LOCK_S) -> list[Path]:
    """Lock files older than max_age_s in torch's extension cache (TORCH_EXTENSIONS_DIR, else
    ~/.cache/torch_extensions): DeepSpeed compiles a small op there on its first start, a process killed
    during that compile leaves the op's `lock`, and every later start then waits on it without a word."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    if not root.is_dir():
        return []
    now = time.time()
    locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]
    return sorted(p for p in locks if now - p.stat().st_mtime > max_age_s)


def init_distributed(derived: Derived, local_rank: int) -> None:
    """Join the launcher's process group, or make a one-process group when there is no launcher."""
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if derived.device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=derived.backend, verbose=False)
    if dist.get_world_size() != derived.world_size:
        raise RuntimeError(f"process group has {dist.get_world_size()} ranks, expected {derived.world_size}")


def setup_logging(run: Path, rank: int) -> list[logging.Handler]:
    """Rank 0 logs INFO to the console and <run>/train.log; other ranks only warnings to the console."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        handlers.append(logging.FileHandler(run / "train.log"))
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S")
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return handlers


def segment_seed(seed: int, rank: int, segment_start: int) -> int:
    return int(np.random.SeedSequence([seed, rank, segment_start]).generate_state(1)[0])


def open_segment(
    cfg: PretrainConfig, urls: list[str], rank: int, segment_start: int, device: str
) -> tuple[Iterator[dict[str, Any]], torch.Generator]:
    """Micro batches and the noise generator of the data segment that starts at `segment_start`."""
    from shards.reader import make_loader, to_float_batch

    loader = make_loader(
        urls,
        batch_size=cfg.train.micro_batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.train.seed,
        epoch=segment_start,
        resampled=True,
        shuffle_buffer=cfg.data.shuffle_buffer,
        image_size_px=cfg.model.image_size_px,
        output_dtype="uint8",  # a quarter of float32's bytes to hand over from the workers
        recycle=0,  # workers refill their shared buffers: each batch is converted below before the next
    )
    seed = segment_seed(cfg.train.seed, rank, segment_start)
    torch.manual_seed(seed)  # dropout inside the UNet
    # to float32 on the device: the values the float32 reader gives, bit for bit
    batches = (to_float_batch(batch, device, non_blocking=True) for batch in loader)
    return batches, torch.Generator(device=device).manual_seed(seed)


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup to 1 over optim.warmup_steps, then cosine down to optim.min_lr_ratio at max_steps."""
    o, total = cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def log_line(step: int, max_steps: int, stats: dict[str, float]) -> str:
    """The log line: `step 001200/200000 | loss 0.0812 | lr 1.0e-04 | gnorm 0.41 | 412 ms/step | ...`."""
    w = len(str(max_steps))
    return (
        f"step {step:0{w}d}/{max_steps:0{w}d} | loss {stats['loss']:.4f} | lr {stats['lr']:.1e} | "
        f"gnorm {stats['gnorm']:.2f} | {stats['ms_per_step']:.0f} ms/step | {stats['img_per_s']:.0f} img/s | "
        f"mem {stats['mem_gib']:.1f} GiB"
    )


def grad_norm(module: torch.nn.Module) -> float:
    """L2 norm of all gradients (stage 0 fp32: they are whole and already averaged over ranks)."""
    norms = [torch.linalg.vector_norm(p.grad) for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


@torch.no_grad()
def ema_update(ema: torch.nn.Module | None, engine: Any, step: int, cfg: PretrainConfig, zero3: bool) -> None:
    """ema <- decay * ema + (1 - decay) * weights, on rank 0 (ZeRO-3: every rank joins the gather)."""
    decay = min(cfg.ema.decay, (1 + step) / (10 + step)) if cfg.ema.warmup else cfg.ema.decay
    params = list(engine.module.parameters())

    def lerp() -> None:
        if ema is not None:
            for p_ema, p in zip(ema.parameters(), params, strict=True):
                p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - decay)

    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            lerp()
    else:
        lerp()


# --- the generator, by model.kind: `sd` is the frozen-SD ControlNetGenerator (controlnet) or None (unet) ---


def build_generator(
    cfg: PretrainConfig, sd_folder: Path | None, device: torch.device, dtype: torch.dtype
) -> tuple[torch.nn.Module, Any, ControlNetGenerator | None]:
    """(trainable module, DDPM training schedule, sd). unet: a fresh UNet2DModel and our schedule.
    controlnet: the ControlNet + modality tokens and SD's schedule; the frozen SD VAE and UNet are
    moved to the device in the run's dtype here (DeepSpeed only places what it is given)."""
    if sd_folder is None:
        return build_unet(cfg.model), build_noise_scheduler(cfg.diffusion), None
    from pretrain.controlnet import ControlNetGenerator

    sd = ControlNetGenerator.from_sd15(sd_folder)  # fp32, so the ControlNet starts as an exact copy
    for frozen in (sd.vae, sd.unet):
        frozen.to(device)
        if dtype != torch.float32:  # diffusers warns on any cast: only cast when it changes something
            frozen.to(dtype=dtype)
    return sd.branch, sd.scheduler, sd


def diffusion_space(
    sd: ControlNetGenerator | None, image_B3HW: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """x0_BCHW, what the diffusion runs on: the image (unet), or its VAE latents times the VAE's scaling
    factor, sampled from the latent distribution with `generator` (controlnet), in fp32."""
    if sd is None:
        return image_B3HW
    return sd.encode(image_B3HW, generator).float()


def predict(
    sd: ControlNetGenerator | None,
    model: Any,
    noisy_BCHW: torch.Tensor,
    t_B: torch.Tensor,
    mask_B1HW: torch.Tensor,
    fov_B1HW: torch.Tensor,
    modality_B: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The model's noise or velocity prediction; `model` is the DeepSpeed engine when training and the
    EMA copy of the trainable module in eval (controlnet: it steers the frozen SD UNet)."""
    if sd is None:
        x_in = unet_input(noisy_BCHW, mask_B1HW, fov_B1HW).to(dtype)
        return model(x_in, t_B, class_labels=modality_B).sample
    cond_B2HW = torch.cat([mask_B1HW, fov_B1HW], dim=1)
    return sd(noisy_BCHW, t_B, modality_B, cond_B2HW, branch=model)


def generate(
    sd: ControlNetGenerator | None,
    ema: Any,
    scheduler: Any,
    batch: dict[str, torch.Tensor],
    cfg: PretrainConfig,
) -> torch.Tensor:
    """Images (B x 3 x H x W in [-1, 1], on the CPU) from the EMA weights, seed i for example i."""
    s, n = cfg.sampling, batch["mask"].shape[0]
    if sd is None:
        from pretrain.pipeline import VesselPipeline

        pipe = VesselPipeline(ema, scheduler, s.sampler, s.num_inference_steps, s.guidance_scale)
        return pipe(batch["mask"], batch["modality"], seeds=list(range(n)), fov_B1HW=batch["fov"]).cpu()
    gen = sd.with_branch(ema)  # the EMA ControlNet + tokens on the shared frozen SD parts
    steps, scale = s.num_inference_steps, s.guidance_scale
    return gen.sample(batch["mask"], batch["modality"], list(range(n)), batch["fov"], steps, scale).cpu()


def save_generator_folder(
    sd: ControlNetGenerator | None, ema: Any, scheduler: Any, folder: Path, info: GeneratorInfo
) -> None:
    """generator/ of a checkpoint from the EMA weights: unet: diffusers UNet2DModel + scheduler;
    controlnet: controlnet/ + modality_tokens.safetensors (the frozen SD stays at model.sd_path)."""
    if sd is None:
        save_generator(ema, scheduler, folder, info)
    else:
        sd.with_branch(ema).save(folder, info)


def ema_weight_files(sd: ControlNetGenerator | None) -> dict[str, str]:
    """Where the EMA weights lie in generator/, by state-dict prefix (what resume reads back)."""
    if sd is None:
        return UNET_WEIGHT_FILES
    from pretrain.controlnet import WEIGHT_FILES

    return WEIGHT_FILES


# --- eval: a fixed batch, a fixed-noise loss, a sample grid ---


def fixed_examples(
    cfg: PretrainConfig, urls: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(eval batch, grid batch) from one seeded pass in shard order: the same examples every run."""
    from shards.reader import make_dataset

    dataset = make_dataset(
        urls,
        seed=cfg.train.seed,
        resampled=False,
        shuffle_buffer=0,
        image_size_px=cfg.model.image_size_px,
        rank=0,
        world_size=1,
    )
    evals: list[dict[str, Any]] = []
    grid: dict[int, list[dict[str, Any]]] = {}
    per, num_eval = cfg.sampling.grid_per_modality, cfg.train.eval_num_samples
    scan_limit = num_eval + 8 * NUM_MODALITY_SLOTS * per  # a modality the corpus lacks is not waited for
    for i, item in enumerate(dataset):
        if len(evals) < num_eval:
            evals.append(item)
        slot = grid.setdefault(int(item["modality"]), [])
        if len(slot) < per:
            slot.append(item)
        grid_full = len(grid) == NUM_MODALITY_SLOTS and all(len(s) == per for s in grid.values())
        if (len(evals) == num_eval and grid_full) or i + 1 >= scan_limit:
            break

    def stack(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([it[k] for it in items]) for k in ("image", "mask", "fov", "modality")}

    return stack(evals), stack([it for m in sorted(grid) for it in grid[m]])


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module,
    scheduler: Any,
    batch: dict[str, torch.Tensor],
    seed: int,
    sd: ControlNetGenerator | None = None,
) -> float:
    """Loss of `model` (a UNet; with `sd`, a ControlNetBranch) on the eval batch at evenly spaced
    timesteps, fixed noise (and fixed latent samples): comparable across steps."""
    p = next(model.parameters())
    device = p.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    x0_BCHW = diffusion_space(sd, batch["image"].to(device), g)
    b = x0_BCHW.shape[0]
    noise_BCHW = torch.randn(x0_BCHW.shape, generator=g).to(device)
    t_B = torch.linspace(0, scheduler.config.num_train_timesteps - 1, b).round().long().to(device)
    noisy_BCHW = scheduler.add_noise(x0_BCHW, noise_BCHW, t_B)
    mask_B1HW, fov_B1HW, modality_B = (batch[k].to(device) for k in ("mask", "fov", "modality"))
    pred_BCHW = predict(sd, model, noisy_BCHW, t_B, mask_B1HW, fov_B1HW, modality_B, p.dtype)
    return float(F.mse_loss(pred_BCHW.float(), diffusion_target(scheduler, x0_BCHW, noise_BCHW, t_B).float()))


def sample_grid(
    model: torch.nn.Module,
    scheduler: Any,
    batch: dict[str, torch.Tensor],
    cfg: PretrainConfig,
    sd: ControlNetGenerator | None = None,
) -> np.ndarray:
    """uint8 H x W x 3 picture: one row per example, mask | generated | real, grouped by modality."""
    generated = generate(sd, model, scheduler, batch, cfg)
    mask_3 = batch["mask"].expand(-1, 3, -1, -1) * 2 - 1
    rows = torch.cat([mask_3, generated, batch["image"]], dim=3)  # B x 3 x H x 3W
    picture = torch.cat(list(rows), dim=1)  # 3 x BH x 3W
    return ((picture.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


# --- the run ---


def train(cfg: PretrainConfig, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run (or continue) a pretraining run; returns what summary.json holds. See the module doc."""
    import deepspeed
    import torch.distributed as dist
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    rank, local_rank, world_size = launch_env()
    derived = derive(cfg, world_size)
    ds_config = deepspeed_config(cfg, derived)
    sd_folder = check_sd_folder(cfg)  # model.kind controlnet: the frozen SD 1.5 folder; None for unet
    ckpt, meta = plan_run_folder(cfg, derived, resume, overwrite)
    urls, data_hash = check_shards(cfg, hash_files=cfg.data.check_sha256 and local_rank == 0)

    for lock in stale_extension_locks():
        log.warning(
            "%s is %.0f minutes old: unless another process is compiling that op now, a compile was killed "
            "half-way and this start will wait on it for ever; delete %s and start again",
            lock,
            (time.time() - lock.stat().st_mtime) / 60,
            lock.parent,
        )
    init_distributed(derived, local_rank)
    run = Path(cfg.out)
    dist.barrier()  # every rank has checked the run folder before rank 0 changes it
    if rank == 0:
        if overwrite and run.exists():
            shutil.rmtree(run)
        (run / "samples").mkdir(parents=True, exist_ok=True)
        for tmp in temp_folders(run):  # a checkpoint a crash left half-written
            shutil.rmtree(tmp, ignore_errors=True)
        (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    dist.barrier()
    handlers = setup_logging(run, rank)
    tb = SummaryWriter(str(run / "tensorboard")) if rank == 0 else None
    dev, dtype = derived.device, torch.bfloat16 if derived.bf16 else torch.float32
    device = torch.device(dev)
    log.info("univg pretrain %s -> %s | config %s", cfg.name, run, config_hash(cfg)[:12])
    log.info(derived.line())

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    # trainable: the UNet, or the ControlNet + modality tokens; sd: the frozen SD parts (None for unet)
    trainable, noise_scheduler, sd = build_generator(cfg, sd_folder, device, dtype)
    ema = copy.deepcopy(trainable).requires_grad_(False).to(device).eval() if rank == 0 else None
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        trainable.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    num_params = count_parameters(trainable)  # before ZeRO-3 partitions it
    engine, _, _, _ = deepspeed.initialize(
        model=trainable, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    if sd is None:
        what = f"UNet {num_params / 1e6:.2f}M parameters"
    else:
        what = (
            f"ControlNet + modality tokens {num_params / 1e6:.2f}M trained parameters on frozen SD "
            f"(UNet {count_parameters(sd.unet) / 1e6:.1f}M, VAE {count_parameters(sd.vae) / 1e6:.1f}M) "
            f"from {sd_folder}"
        )
    log.info("%s, %d px, modalities %s + spare slot", what, cfg.model.image_size_px, ",".join(MODALITIES))

    step, started = 0, time.time()
    if ckpt is not None and meta is not None:
        load_checkpoint(engine, ema, ckpt, ema_weight_files(sd))
        step = int(meta["step"])
        if meta.get("manifest_hash") != data_hash:
            log.warning(
                "the corpus differs from the one checkpoint %s was trained on (manifest hash)", ckpt.name
            )
        log.info("resumed from %s at step %d (data segment start %d)", ckpt, step, step)
    elif resume == "auto":
        log.info("--resume auto: no complete checkpoint in %s, starting at step 0", run / "checkpoints")

    eval_batch, grid_batch = fixed_examples(cfg, urls) if rank == 0 else ({}, {})
    info = GeneratorInfo(cfg.model, cfg.diffusion, cfg.sampling, MODALITIES, step)
    metrics = open(run / "metrics.jsonl", "a") if rank == 0 else None
    zero3, accum, width = derived.zero_stage == 3, derived.grad_accum_steps, len(str(cfg.train.max_steps))
    p_drop, num_t = cfg.diffusion.mask_dropout_prob, noise_scheduler.config.num_train_timesteps
    batch_size = derived.global_batch_size
    # DeepSpeed reports no gradient norm for plain fp32 data parallel: we compute it then
    own_norm = derived.zero_stage == 0 and not derived.bf16

    def record(row: dict[str, Any]) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    def evaluate() -> None:
        if rank != 0 or ema is None:
            return
        loss = eval_loss(ema, noise_scheduler, eval_batch, cfg.train.seed, sd)
        picture = sample_grid(ema, noise_scheduler, grid_batch, cfg, sd)
        Image.fromarray(picture).save(run / "samples" / f"step_{step:07d}.png")
        assert tb is not None
        tb.add_scalar("eval/loss_ema", loss, step)
        tb.add_image("samples", picture, step, dataformats="HWC")
        record({"step": step, "eval_loss": loss})
        log.info(
            "eval step %0*d | ema loss %.4f | grid %s", width, step, loss, f"samples/step_{step:07d}.png"
        )

    def save() -> None:
        data_position = {
            "segment_start_step": step,
            "samples_consumed": step * derived.global_batch_size,
            "seed": cfg.train.seed,
            "num_workers": cfg.data.num_workers,
        }
        meta_out = {
            "step": step,
            "config": to_dict(cfg),
            "config_hash": config_hash(cfg),
            "world_size": world_size,
            "derived": dataclasses.asdict(derived),
            "data_position": data_position,
            "manifest_hash": data_hash,
            "univg_version": univg.__version__,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        info_now = dataclasses.replace(info, step=step)

        def write_generator(folder: Path) -> None:  # rank 0, which holds the EMA weights
            save_generator_folder(sd, ema, noise_scheduler, folder, info_now)

        folder = save_checkpoint(
            engine, write_generator, run, step, meta_out, cfg.train.keep_last_checkpoints
        )
        log.info("checkpoint %s", folder)

    if ckpt is None:
        record({"event": "start", "step": step})
        evaluate()
    else:
        record({"event": "resume", "step": step, "from": str(ckpt)})
    batches, noise_gen = open_segment(cfg, urls, rank, step, derived.device)
    losses: list[float] = []
    gnorm, interval_s, status, error = float("nan"), 0.0, "failed", None
    try:
        while step < cfg.train.max_steps:
            tick, lr, step_loss = time.perf_counter(), engine.get_lr()[0], 0.0
            for _ in range(accum):
                batch = next(batches)
                mask_B1HW, fov_B1HW = batch["mask"].to(device), batch["fov"].to(device)
                modality_B = batch["modality"].to(device)
                # image -> what the diffusion runs on (controlnet: latents of the frozen VAE)
                x0_BCHW = diffusion_space(sd, batch["image"].to(device), noise_gen)
                b = x0_BCHW.shape[0]
                # sample t and noise -> add noise
                t_B = torch.randint(0, num_t, (b,), generator=noise_gen, device=device)
                noise_BCHW = torch.randn(x0_BCHW.shape, generator=noise_gen, device=device)
                keep_B = (torch.rand(b, generator=noise_gen, device=device) >= p_drop).float()
                noisy_BCHW = noise_scheduler.add_noise(x0_BCHW, noise_BCHW, t_B)
                # forward with mask (dropped where keep_B is 0) and modality -> loss
                kept_B1HW = mask_B1HW * keep_B[:, None, None, None]
                pred_BCHW = predict(sd, engine, noisy_BCHW, t_B, kept_B1HW, fov_B1HW, modality_B, dtype)
                target_BCHW = diffusion_target(noise_scheduler, x0_BCHW, noise_BCHW, t_B)
                loss = F.mse_loss(pred_BCHW.float(), target_BCHW)
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss)  # every rank sees the same value, so all stop together
                mean_loss_value = float(mean_loss) / world_size
                if not math.isfinite(mean_loss_value):
                    raise FloatingPointError(f"non-finite loss {mean_loss_value} at step {step + 1}")
                step_loss += mean_loss_value / accum
                # backward -> clip -> step (DeepSpeed clips and steps at the accumulation boundary)
                engine.backward(loss)
                if own_norm and engine.is_gradient_accumulation_boundary():
                    gnorm = grad_norm(engine.module)
                engine.step()
            step += 1
            ema_update(ema, engine, step, cfg, zero3)
            ds_norm = engine.get_global_grad_norm()  # ZeRO and bf16 optimizers report the pre-clip norm
            gnorm = gnorm if ds_norm is None else float(ds_norm)
            losses.append(step_loss)
            record({"step": step, "loss": step_loss, "lr": lr, "gnorm": gnorm})
            # log -> eval -> save
            last = step == cfg.train.max_steps
            if step % cfg.train.log_every_steps == 0 or last:
                if dev == "cuda":
                    torch.cuda.synchronize()
                interval_s += time.perf_counter() - tick
                n = step % cfg.train.log_every_steps or cfg.train.log_every_steps
                ms = 1000 * interval_s / n
                stats = {"loss": float(np.mean(losses[-n:])), "lr": lr, "gnorm": gnorm, "ms_per_step": ms,
                         "img_per_s": 1000 * batch_size / ms, "mem_gib": peak_memory_gib(dev)}  # fmt: skip
                log.info(log_line(step, cfg.train.max_steps, stats))
                if tb is not None:
                    for key, value in stats.items():
                        tb.add_scalar(f"train/{key}", value, step)
                interval_s = 0.0
            else:
                interval_s += time.perf_counter() - tick
            if (cfg.train.eval_every_steps and step % cfg.train.eval_every_steps == 0) or last:
                evaluate()
            if (cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0) or last:
                save()
                batches, noise_gen = open_segment(cfg, urls, rank, step, derived.device)  # next data segment
        status = "completed"
    except FloatingPointError as e:
        status, error = "diverged", str(e)
        log.error("stopping: %s", e)
    finally:
        done = complete_checkpoints(run)
        summary = {
            "status": status,
            "error": error,
            "name": cfg.name,
            "step": step,
            "max_steps": cfg.train.max_steps,
            "final_loss": losses[-1] if losses else None,
            "resumed_from": str(ckpt) if ckpt else None,
            "generator": str(done[-1][1] / "generator") if done else None,
            "checkpoints": [str(p) for _, p in done],
            "wall_s": round(time.time() - started, 1),
            "derived": dataclasses.asdict(derived),
            "config_hash": config_hash(cfg),
            "manifest_hash": data_hash,
        }
        if rank == 0 and status != "failed":
            write_json(run / "summary.json", summary)
            log.info("run %s at step %d -> %s", status, step, run / "summary.json")
        if metrics is not None:
            metrics.close()
        if tb is not None:
            tb.close()
        for h in handlers:
            log.removeHandler(h)
            h.close()
    if status == "diverged":
        raise FloatingPointError(error)
    return summary

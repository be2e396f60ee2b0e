"""The pretraining config: one frozen dataclass for `univg pretrain`, and the numbers derived from it.

    cfg = load_pretrain_config("configs/pretrain/tiny.yaml", ["optim.lr=3e-4"])
    derived = derive(cfg, world_size=8)     # gradient accumulation etc., ValueError when they do not fit

`model` and `diffusion` define the generator: a checkpoint only resumes under the same two sections.
`model.kind` picks it: `unet` (our pixel-space UNet2DModel, the default) or `controlnet` (UniVG's
recipe: a ControlNet on a frozen local Stable Diffusion 1.5, `model.sd_path`; see controlnet.py).
The files a controlnet config names are checked by `check_sd_folder` when a run starts, not on load,
so a YAML that names weights this machine lacks still parses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from univg.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]  # repository root: relative config paths also resolve here


SD_PARTS = ("unet", "vae", "scheduler")  # subfolders of a diffusers Stable Diffusion folder that we read
# diffusers' DDPMScheduler defaults, for a scheduler_config.json that leaves a key out
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}


@dataclass(frozen=True)
class ModelConfig:
    """The generator. kind unet: diffusers UNet2DModel, noisy image + mask + FOV in, modality as a class
    embedding; the architecture fields below define it. kind controlnet: a trainable ControlNet (mask,
    FOV) + modality tokens on the frozen SD 1.5 VAE and UNet at sd_path; the UNet-only fields are unused."""

    kind: Literal["unet", "controlnet"] = "unet"  # which generator (see the class doc)
    sd_path: str | None = None  # controlnet only: local SD 1.5 diffusers folder (unet/, vae/, scheduler/)
    image_size_px: int = 32  # side of generated images (px); unet: a multiple of 2**(levels - 1)
    block_out_channels: tuple[int, ...] = (16, 32)  # channels per resolution level (count)
    layers_per_block: int = 1  # ResNet blocks per level (count)
    attention_levels: tuple[bool, ...] = (False, True)  # self-attention blocks at each level (flags)
    attention_head_dim: int = 8  # channels per attention head (count)
    norm_num_groups: int = 8  # GroupNorm groups (count); divides every level's channels
    dropout: float = 0.0  # dropout probability in ResNet blocks

    def __post_init__(self) -> None:
        if self.kind == "controlnet":
            if not self.sd_path:
                raise ValueError(
                    "model.kind=controlnet needs model.sd_path: a local Stable Diffusion 1.5 folder in "
                    "diffusers layout (unet/, vae/, scheduler/); nothing is downloaded"
                )
            # the VAE halves 3 times; check_sd_folder checks the SD UNet's own halvings on top
            if self.image_size_px < 8 or self.image_size_px % 8:
                raise ValueError(
                    f"model.image_size_px={self.image_size_px} must be a positive multiple of 8 for "
                    "model.kind=controlnet (the SD VAE's latents are 1/8 of the image side)"
                )
        elif self.sd_path is not None:
            raise ValueError(
                f"model.sd_path={self.sd_path!r} is only read by model.kind=controlnet (kind is "
                f"{self.kind!r}): set model.kind: controlnet, or remove model.sd_path"
            )
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("model.block_out_channels must list at least one level")
        if len(self.attention_levels) != n:
            raise ValueError(
                f"model.attention_levels has {len(self.attention_levels)} flags but "
                f"model.block_out_channels has {n} levels: give one flag per level"
            )
        factor = 2 ** (n - 1)
        if self.kind == "unet" and (self.image_size_px < factor or self.image_size_px % factor):
            raise ValueError(
                f"model.image_size_px={self.image_size_px} must be a positive multiple of {factor} "
                f"(the UNet halves it {n - 1} times for {n} levels)"
            )
        bad = [c for c in self.block_out_channels if c < 1 or c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"model.block_out_channels {list(self.block_out_channels)} must all be multiples of "
                f"model.norm_num_groups={self.norm_num_groups}"
            )
        if self.layers_per_block < 1 or self.attention_head_dim < 1:
            raise ValueError("model.layers_per_block and model.attention_head_dim must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")


@dataclass(frozen=True)
class DiffusionConfig:
    """The training noise schedule (diffusers DDPMScheduler) and mask dropout for guidance."""

    num_train_timesteps: int = 1000  # diffusion steps of the forward process (count)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"  # noise
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"  # what the UNet predicts
    mask_dropout_prob: float = 0.1  # probability a training sample sees an all-zero mask (CFG), 0..1

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"diffusion.num_train_timesteps={self.num_train_timesteps} must be >= 2")
        if not 0.0 <= self.mask_dropout_prob < 1.0:
            raise ValueError(f"diffusion.mask_dropout_prob={self.mask_dropout_prob} must be in [0, 1)")


@dataclass(frozen=True)
class SamplingConfig:
    """How images are drawn: for the sample grids here, and as the saved generator's defaults."""

    sampler: Literal["ddim", "dpm"] = "ddim"  # DDIM, or DPM-Solver++ (multistep; best with v_prediction)
    num_inference_steps: int = 25  # denoising steps (count); 20-50 is the useful range
    guidance_scale: float = 1.0  # classifier-free guidance on the mask; 1 = none (one UNet pass)
    grid_per_modality: int = 2  # examples per modality in the sample grid (count)

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"sampling.num_inference_steps={self.num_inference_steps} must be >= 1")
        if self.guidance_scale < 0:
            raise ValueError(f"sampling.guidance_scale={self.guidance_scale} must be >= 0")
        if self.grid_per_modality < 1:
            raise ValueError(f"sampling.grid_per_modality={self.grid_per_modality} must be >= 1")


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how they are read."""

    shards: str = "data/shards/tiny"  # corpus folder holding manifest.json (made by `univg shards build`)
    num_workers: int = 2  # DataLoader worker processes per rank (count)
    shuffle_buffer: int = 1000  # raw samples held for shuffling per worker (count)
    check_sha256: bool = True  # hash every shard against the manifest before training (else sizes only)

    def __post_init__(self) -> None:
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("data.num_workers and data.shuffle_buffer must be >= 0")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay, gradient clipping."""

    lr: float = 1e-4  # peak learning rate (per step)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decay rates
    weight_decay: float = 0.0  # AdamW decoupled weight decay (per step, times lr)
    eps: float = 1e-8  # AdamW denominator epsilon
    warmup_steps: int = 500  # optimizer steps of linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr, reached at train.max_steps
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 turns clipping off

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.grad_clip < 0:
            raise ValueError(
                "optim: lr must be > 0, warmup_steps >= 0, min_lr_ratio in [0, 1], grad_clip >= 0 "
                f"(got lr={self.lr}, warmup_steps={self.warmup_steps}, min_lr_ratio={self.min_lr_ratio}, "
                f"grad_clip={self.grad_clip})"
            )


@dataclass(frozen=True)
class EmaConfig:
    """Exponential moving average of the weights, kept on rank 0; it is what gets saved as the generator."""

    decay: float = 0.9999  # EMA decay per optimizer step, reached after warm-up
    warmup: bool = True  # use min(decay, (1 + step) / (10 + step)) so early EMA follows the model

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay={self.decay} must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Steps, batch sizes, precision, DeepSpeed and the logging / eval / checkpoint intervals."""

    max_steps: int = 100  # optimizer steps to train (count)
    global_batch_size: int = 8  # images per optimizer step over all ranks (count)
    micro_batch_size: int = 8  # images per forward/backward on one rank (count)
    seed: int = 0  # model init (same on every rank); noise/timesteps use (seed, rank, segment start)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    deepspeed_config: str = "configs/deepspeed/zero0.json"  # ZeRO JSON; batch fields are filled in here
    log_every_steps: int = 10  # optimizer steps between log lines / TensorBoard scalars
    eval_every_steps: int = 100  # optimizer steps between eval loss + sample grid (0 = only at the end)
    checkpoint_every_steps: int = 100  # optimizer steps between checkpoints (the last step always saves)
    keep_last_checkpoints: int = 3  # complete checkpoints kept; older ones are deleted (count)
    eval_num_samples: int = 16  # fixed examples for the eval loss (count)

    def __post_init__(self) -> None:
        for name in ("max_steps", "global_batch_size", "micro_batch_size", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        for name in ("eval_every_steps", "checkpoint_every_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 0 (0 = only at the end)")
        if self.keep_last_checkpoints < 1 or self.eval_num_samples < 1:
            raise ValueError("train.keep_last_checkpoints and train.eval_num_samples must be >= 1")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything `univg pretrain` does: the generator, its data, its optimisation and its run folder."""

    name: str = "pretrain"  # run name, shown in logs and summary.json
    out: str = "runs/pretrain/tiny"  # run folder: config, logs, TensorBoard, samples, checkpoints
    model: ModelConfig = field(default_factory=ModelConfig)  # the UNet
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # noise schedule, mask dropout
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # sampler for grids and as default
    data: DataConfig = field(default_factory=DataConfig)  # shards
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW + schedule
    ema: EmaConfig = field(default_factory=EmaConfig)  # EMA weights
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, batches, DeepSpeed, intervals

    def __post_init__(self) -> None:
        if self.model.kind == "controlnet" and self.sampling.sampler != "ddim":
            raise ValueError(
                f"sampling.sampler={self.sampling.sampler!r}: the controlnet generator samples with DDIM "
                "only (DPM-Solver's thresholding here is for pixel-space images); set sampling.sampler: ddim"
            )


def load_pretrain_config(path: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    """Load a pretrain YAML plus dotted overrides; a bad value raises a ConfigError naming the file."""
    try:
        return load_config(PretrainConfig, path, overrides)
    except ConfigError:
        raise
    except ValueError as e:  # a field check in __post_init__
        raise ConfigError(f"{path}: {e}") from e


def resolve_path(path: str | Path) -> Path:
    """A config path as given if it exists (absolute or relative to the working folder), else relative
    to the repository root, so `configs/deepspeed/zero2.json` works from anywhere."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return ROOT / p if (ROOT / p).exists() else p


@dataclass(frozen=True)
class Derived:
    """Numbers that follow from the config and the launch; computed once, logged at start."""

    world_size: int  # processes over all nodes (count)
    grad_accum_steps: int  # micro batches per optimizer step on each rank (count)
    micro_batch_size: int  # images per forward/backward on one rank (count)
    global_batch_size: int  # images per optimizer step over all ranks (count)
    zero_stage: int  # DeepSpeed ZeRO stage 0-3
    bf16: bool  # bf16 weights and activations (else fp32)
    device: str  # "cuda" or "cpu"
    backend: str  # torch.distributed backend: nccl on CUDA, gloo on CPU

    def line(self) -> str:
        return (
            f"world size {self.world_size} | micro batch {self.micro_batch_size} | grad accumulation "
            f"{self.grad_accum_steps} | global batch {self.global_batch_size} | ZeRO {self.zero_stage} | "
            f"{'bf16' if self.bf16 else 'fp32'} | {self.backend} on {self.device}"
        )


def derive(cfg: PretrainConfig, world_size: int, cuda: bool | None = None) -> Derived:
    """Gradient accumulation, precision and device for `world_size` processes; ValueError if the
    global batch does not split into micro batches over the ranks."""
    import torch

    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if world_size < 1 or t.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{t.micro_batch_size} x world size {world_size} = {per_step}: choose a global batch that is, "
            f"e.g. {max(1, round(t.global_batch_size / per_step)) * per_step}, or another micro batch"
        )
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if t.precision == "bf16" and not cuda:
        raise ValueError("train.precision=bf16 needs CUDA here; use fp32 (or auto) on CPU")
    bf16 = t.precision == "bf16" or (t.precision == "auto" and cuda)
    stage = int(read_deepspeed_json(t.deepspeed_config).get("zero_optimization", {}).get("stage", 0))
    return Derived(
        world_size=world_size,
        grad_accum_steps=t.global_batch_size // per_step,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        zero_stage=stage,
        bf16=bf16,
        device="cuda" if cuda else "cpu",
        backend="nccl" if cuda else "gloo",
    )


def check_sd_folder(cfg: PretrainConfig) -> Path | None:
    """For model.kind=controlnet, the SD 1.5 folder at model.sd_path, checked against the config:
    unet/, vae/, scheduler/ with their configs and safetensors weights, an image size the VAE and the SD
    UNet can halve, and a diffusion config equal to the SD scheduler's (the frozen UNet was trained with
    it). ValueError naming the field otherwise; None for kind unet. Reads only small JSON files."""
    m, d = cfg.model, cfg.diffusion
    if m.kind != "controlnet":
        return None
    assert m.sd_path is not None  # ModelConfig checks it
    folder = resolve_path(m.sd_path)
    where = f"model.sd_path={m.sd_path!r}"
    if not folder.is_dir():
        raise ValueError(
            f"{where}: no such folder; point it at a local Stable Diffusion 1.5 copy in diffusers layout "
            "(unet/, vae/, scheduler/), e.g. one made by diffusers' save_pretrained; nothing is downloaded"
        )
    configs: dict[str, dict[str, Any]] = {}
    for part in SD_PARTS:
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        path = folder / part / name
        if not path.is_file():
            raise ValueError(
                f"{where} is not a diffusers Stable Diffusion folder: {part}/{name} is missing "
                f"(it needs {', '.join(p + '/' for p in SD_PARTS)})"
            )
        try:
            configs[part] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: {path} is not valid JSON: {e}") from e
        if part != "scheduler" and not list((folder / part).glob("*.safetensors")):
            raise ValueError(
                f"{where}: {part}/ holds no .safetensors weights (pickled .bin files are never loaded); "
                "convert it with diffusers' save_pretrained(..., safe_serialization=True)"
            )
    factor = 2 ** (len(configs["vae"].get("block_out_channels", [0] * 4)) - 1)
    factor *= 2 ** (len(configs["unet"].get("block_out_channels", [0] * 4)) - 1)
    if m.image_size_px % factor:
        raise ValueError(
            f"model.image_size_px={m.image_size_px} must be a multiple of {factor} for the SD folder at "
            f"{folder}: the VAE and then the UNet halve the image side (SD 1.5: 8 x 8 = 64, e.g. 512)"
        )
    sched = configs["scheduler"]
    for key, now in (
        ("num_train_timesteps", d.num_train_timesteps),
        ("beta_schedule", d.beta_schedule),
        ("prediction_type", d.prediction_type),
    ):
        theirs = sched.get(key, SCHEDULER_DEFAULTS[key])
        if theirs != now:
            raise ValueError(
                f"diffusion.{key}={now!r} but the SD scheduler in {folder / 'scheduler'} has {theirs!r}: "
                f"the frozen SD UNet was trained with it; set diffusion.{key}: {theirs}"
            )
    return folder


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """The DeepSpeed JSON named by train.deepspeed_config; ValueError if missing or malformed."""
    p = resolve_path(path)
    if not p.is_file():
        raise ValueError(
            f"train.deepspeed_config={str(path)!r}: no such file (try configs/deepspeed/zero2.json)"
        )
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"train.deepspeed_config {p} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"train.deepspeed_config {p} must hold a JSON object")
    for key in ("optimizer", "scheduler", "fp16"):
        if key in data:
            raise ValueError(
                f"train.deepspeed_config {p} sets {key!r}: the optimizer (AdamW), LR schedule and precision "
                "come from the pretrain config (optim.*, train.precision); remove it from the JSON"
            )
    stage = data.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"train.deepspeed_config {p}: zero_optimization.stage={stage!r} must be 0-3")
    return data


def deepspeed_config(cfg: PretrainConfig, derived: Derived) -> dict[str, Any]:
    """The DeepSpeed config dict: the JSON with batch sizes, accumulation, clipping and precision filled
    in from the derived numbers. A value the JSON sets explicitly must agree with them."""
    data = read_deepspeed_json(cfg.train.deepspeed_config)
    fill = {
        "train_batch_size": derived.global_batch_size,
        "train_micro_batch_size_per_gpu": derived.micro_batch_size,
        "gradient_accumulation_steps": derived.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in fill.items():
        given = data.get(key, "auto")
        if given != "auto" and given != value:
            raise ValueError(
                f"train.deepspeed_config sets {key}={given!r} but the pretrain config gives {value!r}; "
                f'write "auto" in the JSON (batch sizes come from train.*, clipping from optim.grad_clip)'
            )
        data[key] = value
    bf16 = data.get("bf16", {}).get("enabled", "auto")
    if bf16 != "auto" and bool(bf16) != derived.bf16:
        raise ValueError(
            f"train.deepspeed_config sets bf16.enabled={bf16!r} but train.precision resolves to "
            f'{"bf16" if derived.bf16 else "fp32"}; write "auto" in the JSON'
        )
    data["bf16"] = {**data.get("bf16", {}), "enabled": derived.bf16}
    data.setdefault("zero_allow_untested_optimizer", True)  # we hand DeepSpeed a torch AdamW
    data.setdefault("steps_per_print", 2**62)  # our own log line replaces DeepSpeed's
    return data

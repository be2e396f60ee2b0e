"""The generator: a diffusers UNet2DModel conditioned on a vessel mask, a FOV and a modality.

The UNet sees the noisy image with the mask and the FOV as two extra input channels
(in_channels = 3 + 2) and the modality as a class embedding added to the timestep embedding
(num_class_embeds = len(MODALITIES) + 1; the last index is the spare slot for a modality the corpus
never had). A DDPMScheduler defines the training noise; DDIM or DPM-Solver samples (pipeline.py).

A generator folder is plain diffusers, so stock diffusers loads it:

    unet = UNet2DModel.from_pretrained(folder)            # config.json + diffusion_pytorch_model.safetensors
    scheduler = DDPMScheduler.from_pretrained(folder)     # scheduler_config.json
    # univg_generator.json: modality order, conditioning channel layout, our model/diffusion/sampling config

Tensor legend: B batch, C image channels (3), H/W pixels; `x0_B3HW` clean image in [-1, 1],
`noisy_B3HW` noised image, `mask_B1HW` / `fov_B1HW` in {0, 1}, `modality_B` int64, `t_B` timesteps.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from data_engine import MODALITIES
from pretrain.config import DiffusionConfig, ModelConfig, SamplingConfig
from univg.config import config_from_dict, to_dict

IMAGE_CHANNELS = 3  # RGB; grey modalities are replicated by the reader
COND_CHANNELS = 2  # mask, FOV
NUM_MODALITY_SLOTS = len(MODALITIES) + 1  # built-in modalities + the spare slot
SPARE_MODALITY = len(MODALITIES)
GENERATOR_INFO = "univg_generator.json"
FORMAT = "univg-generator/1"


def build_unet(cfg: ModelConfig) -> Any:
    """A freshly initialised UNet2DModel for `cfg` (seed torch first for the same init everywhere).
    Typed Any, like every diffusers object here: their classes are opaque to the type checker."""
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return UNet2DModel(
        sample_size=cfg.image_size_px,
        in_channels=IMAGE_CHANNELS + COND_CHANNELS,
        out_channels=IMAGE_CHANNELS,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout,
        num_class_embeds=NUM_MODALITY_SLOTS,
    )


def build_noise_scheduler(cfg: DiffusionConfig) -> Any:
    """The training schedule: DDPM forward process with epsilon or v prediction."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=True,
        clip_sample_range=1.0,
    )


def sampling_scheduler(noise_scheduler: Any, sampler: str) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """A DDIM or DPM-Solver++ scheduler sharing the training schedule's betas and prediction type.
    Trailing timestep spacing: the first step starts at pure noise even with 20 steps."""
    if sampler == "ddim":
        return DDIMScheduler.from_config(noise_scheduler.config, timestep_spacing="trailing")
    if sampler == "dpm":  # thresholding bounds its x0 estimates, as DDIM's clip_sample does: without it
        # the first steps near zero SNR (cosine schedule, alpha ~ 5e-5) blow the estimate up
        return DPMSolverMultistepScheduler.from_config(
            noise_scheduler.config,
            timestep_spacing="trailing",
            algorithm_type="dpmsolver++",
            thresholding=True,
            sample_max_value=1.0,
        )
    raise ValueError(f"sampler={sampler!r} must be 'ddim' or 'dpm'")


def unet_input(noisy_B3HW: torch.Tensor, mask_B1HW: torch.Tensor, fov_B1HW: torch.Tensor) -> torch.Tensor:
    """The UNet's input: noisy image, mask, FOV stacked on channels (B x 5 x H x W), in the noisy dtype."""
    dtype = noisy_B3HW.dtype
    return torch.cat([noisy_B3HW, mask_B1HW.to(dtype), fov_B1HW.to(dtype)], dim=1)


def diffusion_target(
    scheduler: Any, x0_B3HW: torch.Tensor, noise_B3HW: torch.Tensor, t_B: torch.Tensor
) -> torch.Tensor:
    """What the UNet is trained to output: the noise (epsilon) or the velocity (v prediction)."""
    if scheduler.config.prediction_type == "epsilon":
        return noise_B3HW
    return scheduler.get_velocity(x0_B3HW, noise_B3HW, t_B)


def count_parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


# --- the generator folder ---


@dataclass(frozen=True)
class GeneratorInfo:
    """What univg_generator.json records beside the diffusers files."""

    model: ModelConfig
    diffusion: DiffusionConfig
    sampling: SamplingConfig
    modalities: tuple[str, ...]  # modality order of the class embedding; index len() is the spare slot
    step: int  # optimizer steps the weights were trained for (count)

    def to_dict(self) -> dict[str, Any]:
        if self.model.kind == "unet":
            layout: dict[str, Any] = {"input_channels": ["image_r", "image_g", "image_b", "mask", "fov"]}
        else:  # the frozen SD parts are not in the folder: sd_path names them
            layout = {"conditioning_channels": ["mask", "fov"], "sd_path": self.model.sd_path}
        return {
            "format": FORMAT,
            "kind": self.model.kind,
            "modalities": list(self.modalities),
            "spare_modality_index": len(self.modalities),
            **layout,
            "step": self.step,
            "model": to_dict(self.model),
            "diffusion": to_dict(self.diffusion),
            "sampling": to_dict(self.sampling),
        }


def save_generator(unet: Any, noise_scheduler: Any, folder: str | Path, info: GeneratorInfo) -> None:
    """Write a generator folder: diffusers UNet (safetensors), scheduler config and univg_generator.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder, safe_serialization=True)
    noise_scheduler.save_pretrained(folder)
    write_generator_info(folder, info)


def write_generator_info(folder: str | Path, info: GeneratorInfo) -> None:
    """univg_generator.json of a generator folder (either kind)."""
    (Path(folder) / GENERATOR_INFO).write_text(json.dumps(info.to_dict(), indent=1) + "\n")


def read_generator_info(folder: str | Path) -> GeneratorInfo:
    """Parse univg_generator.json of a generator folder; ValueError naming the file if it is not one."""
    path = Path(folder) / GENERATOR_INFO
    if not path.is_file():
        raise ValueError(f"{folder} is not a univg generator folder: {GENERATOR_INFO} is missing")
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
        return GeneratorInfo(
            model=config_from_dict(ModelConfig, d["model"]),
            diffusion=config_from_dict(DiffusionConfig, d["diffusion"]),
            sampling=config_from_dict(SamplingConfig, d["sampling"]),
            modalities=tuple(d["modalities"]),
            step=int(d["step"]),
        )
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid generator description: {e}") from e


def load_generator(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[UNet2DModel, DDPMScheduler, GeneratorInfo]:
    """Load a generator folder (safetensors only, never pickle): UNet in eval mode, scheduler, info.
    ValueError for a controlnet generator folder (ControlNetGenerator.from_pretrained loads those)."""
    info = read_generator_info(folder)
    if info.model.kind != "unet":
        raise ValueError(
            f"{folder} holds a {info.model.kind} generator (on the frozen SD at {info.model.sd_path}), "
            "not a UNet2DModel: load it with pretrain.controlnet.ControlNetGenerator.from_pretrained"
        )
    unet = UNet2DModel.from_pretrained(str(folder), use_safetensors=True)
    scheduler = DDPMScheduler.from_pretrained(str(folder))
    return unet.to(device).eval(), scheduler, info


def config_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two config dataclasses (or their dicts) differ."""
    da = a if isinstance(a, dict) else dataclasses.asdict(a)
    db = b if isinstance(b, dict) else dataclasses.asdict(b)
    da, db = json.loads(json.dumps(da)), json.loads(json.dumps(db))
    out = []
    for key in sorted(set(da) | set(db)):
        va, vb = da.get(key), db.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} vs {vb!r}")
    return out

"""UniVG's own recipe, as an alternative generator: a ControlNet on a frozen Stable Diffusion 1.5.

    gen = ControlNetGenerator.from_sd15("/models/stable-diffusion-v1-5")   # a local diffusers folder
    noise_pred = gen(noisy_latents_B4hw, t_B, modality_B, cond_B2HW)      # ControlNet + frozen UNet
    image_B3HW = gen.sample(mask_B1HW, modality_B, seeds=[0, 1])           # DDIM in latent space
    gen = ControlNetGenerator.from_pretrained("runs/x/checkpoints/step_0100000/generator")  # trained

The SD folder is read from disk (unet/, vae/, scheduler/ in diffusers layout); nothing is downloaded.
Frozen: the VAE and the SD UNet. Trained (`ControlNetBranch`, all that DeepSpeed and the EMA hold): a
ControlNet copied from the UNet's encoder (diffusers `ControlNetModel.from_unet`) that sees the mask and
the FOV (2 channels at image resolution), and a modality embedding that stands in for the text prompt:
one learned token of the UNet's cross-attention width per modality slot (the last is the spare slot),
so no text encoder is needed.

A generator folder (`save`) holds only the trained part: controlnet/ (diffusers, safetensors),
modality_tokens.safetensors, and univg_generator.json (kind controlnet, the sd_path it was trained on).

Status: trained by `univg pretrain` with `model.kind: controlnet` (configs/pretrain/controlnet-sd15.yaml),
including checkpoints and exact `--resume auto`; tested on CPU with a tiny random SD config only (not
yet on a GPU or with the real SD 1.5 weights). `univg finetune` adapts the UNet generator only.

Tensor legend: B batch, H/W pixels, h/w latent pixels (H / 8 for SD), `latents_B4hw` VAE latents
(scaled), `cond_B2HW` mask and FOV in {0, 1}, `modality_B` int64, `t_B` timesteps, `tokens_B1D` the
modality token per sample (D: the UNet's cross-attention width).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from pretrain.config import resolve_path
from pretrain.model import NUM_MODALITY_SLOTS, GeneratorInfo, read_generator_info, write_generator_info

CONTROLNET = "controlnet"  # subfolder of a generator folder: the ControlNet, diffusers layout
TOKENS = "modality_tokens.safetensors"  # the modality embedding's weight
# ControlNetBranch state-dict prefix -> its file in a generator folder (how resume reloads the EMA)
WEIGHT_FILES = {
    "controlnet.": f"{CONTROLNET}/diffusion_pytorch_model.safetensors",
    "modality_tokens.": TOKENS,
}


class ControlNetBranch(torch.nn.Module):
    """The trained part: the ControlNet (mask, FOV) and one token per modality slot. Gives the tokens
    and the residuals that steer the frozen UNet."""

    def __init__(self, controlnet: Any, cross_attention_dim: int) -> None:
        super().__init__()
        self.controlnet: Any = controlnet
        self.modality_tokens = torch.nn.Embedding(NUM_MODALITY_SLOTS, cross_attention_dim)
        torch.nn.init.normal_(self.modality_tokens.weight, std=0.02)

    def forward(
        self, noisy_B4hw: torch.Tensor, t_B: torch.Tensor, modality_B: torch.Tensor, cond_B2HW: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        """(tokens_B1D, down-block residuals, mid-block residual), in this branch's dtype."""
        dtype = self.modality_tokens.weight.dtype  # bf16 under DeepSpeed bf16; the EMA copy stays fp32
        tokens_B1D = self.modality_tokens(modality_B)[:, None, :]
        down, mid = self.controlnet(
            noisy_B4hw.to(dtype),
            t_B,
            encoder_hidden_states=tokens_B1D,
            controlnet_cond=cond_B2HW.to(dtype),
            return_dict=False,
        )
        return tokens_B1D, tuple(down), mid


class ControlNetGenerator(torch.nn.Module):
    """Frozen SD 1.5 VAE + UNet, trainable ControlNet (mask, FOV) and modality tokens (`branch`)."""

    def __init__(self, vae: Any, unet: Any, branch: ControlNetBranch, scheduler: Any) -> None:
        super().__init__()
        self.vae: Any = vae.requires_grad_(False).eval()
        self.unet: Any = unet.requires_grad_(False).eval()
        self.branch = branch
        self.scheduler: Any = scheduler  # SD's training schedule (DDPM); sampling derives DDIM from it

    @property
    def controlnet(self) -> Any:
        return self.branch.controlnet

    @property
    def modality_tokens(self) -> torch.nn.Embedding:
        return self.branch.modality_tokens

    @classmethod
    def from_sd15(
        cls, sd_folder: str | Path, controlnet_folder: str | Path | None = None
    ) -> ControlNetGenerator:
        """Load SD 1.5 (unet/, vae/, scheduler/) from a local folder, safetensors only; the ControlNet is
        copied from the UNet (seed torch first for the same token init everywhere), or loaded from
        `controlnet_folder` (a generator folder `save` wrote)."""
        folder = Path(sd_folder)
        for part in ("unet", "vae", "scheduler"):
            if not (folder / part).is_dir():
                raise ValueError(f"{folder} is not a diffusers Stable Diffusion folder: {part}/ is missing")
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", use_safetensors=True)
        scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
        if controlnet_folder is None:
            controlnet = ControlNetModel.from_unet(unet, conditioning_channels=2)
        else:
            controlnet = ControlNetModel.from_pretrained(
                str(Path(controlnet_folder) / CONTROLNET), use_safetensors=True
            )
        branch = ControlNetBranch(controlnet, unet.config.cross_attention_dim)
        if controlnet_folder is not None:
            from safetensors.torch import load_file

            branch.modality_tokens.load_state_dict(load_file(str(Path(controlnet_folder) / TOKENS)))
        return cls(vae, unet, branch, scheduler)

    @classmethod
    def from_pretrained(cls, folder: str | Path, sd_folder: str | Path | None = None) -> ControlNetGenerator:
        """A generator folder `univg pretrain` wrote; the frozen SD parts come from `sd_folder`, else from
        the model.sd_path its univg_generator.json records. ValueError if it is not a controlnet one."""
        info = read_generator_info(folder)
        if info.model.kind != "controlnet" or info.model.sd_path is None:
            raise ValueError(
                f"{folder} holds a {info.model.kind} generator: load it with VesselPipeline.from_pretrained"
            )
        return cls.from_sd15(sd_folder or resolve_path(info.model.sd_path), controlnet_folder=folder)

    def with_branch(self, branch: ControlNetBranch) -> ControlNetGenerator:
        """The same frozen VAE, UNet and scheduler (shared, not copied), another trained part (the EMA)."""
        return ControlNetGenerator(self.vae, self.unet, branch, self.scheduler)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.branch.parameters())

    @torch.no_grad()
    def encode(self, image_B3HW: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled VAE latents (what the diffusion runs on), in the VAE's dtype."""
        dist = self.vae.encode(image_B3HW.to(self.vae.dtype)).latent_dist
        return dist.sample(generator) * self.vae.config.scaling_factor

    def forward(
        self,
        noisy_B4hw: torch.Tensor,
        t_B: torch.Tensor,
        modality_B: torch.Tensor,
        cond_B2HW: torch.Tensor,
        branch: Any = None,
    ) -> torch.Tensor:
        """The frozen UNet's noise (or v) prediction, steered by the ControlNet residuals, in the UNet's
        dtype. `branch`: what runs the trained part instead of self.branch (the DeepSpeed engine)."""
        tokens_B1D, down, mid = (self.branch if branch is None else branch)(
            noisy_B4hw, t_B, modality_B, cond_B2HW
        )
        dtype = self.unet.dtype
        return self.unet(
            noisy_B4hw.to(dtype),
            t_B,
            encoder_hidden_states=tokens_B1D.to(dtype),
            down_block_additional_residuals=tuple(r.to(dtype) for r in down),
            mid_block_additional_residual=mid.to(dtype),
        ).sample

    @torch.no_grad()
    def sample(
        self,
        mask_B1HW: torch.Tensor,
        modality_B: torch.Tensor,
        seeds: Sequence[int],
        fov_B1HW: torch.Tensor | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Images (B x 3 x H x W, float32 in [-1, 1], on the UNet's device) by DDIM in latent space, one
        seed per sample. guidance_scale != 1: classifier-free guidance against an all-zero mask (what the
        mask dropout trained), FOV kept: out = uncond + scale * (cond - uncond)."""
        b, _, h, w = mask_B1HW.shape
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if len(seeds) != b or h % factor or w % factor:
            raise ValueError(
                f"need one seed per mask and a size divisible by {factor} (got {b} masks {h}x{w})"
            )
        device = self.unet.device
        mask_B1HW = mask_B1HW.to(device, torch.float32)
        fov_B1HW = torch.ones_like(mask_B1HW) if fov_B1HW is None else fov_B1HW.to(device, torch.float32)
        modality_B = torch.as_tensor(modality_B, dtype=torch.int64, device=device)
        cond_B2HW = torch.cat([mask_B1HW, fov_B1HW], dim=1)
        guided = guidance_scale != 1.0
        if guided:  # one pass over [conditional; unconditional]
            cond_B2HW = torch.cat([cond_B2HW, torch.cat([torch.zeros_like(mask_B1HW), fov_B1HW], dim=1)])
            modality_B = torch.cat([modality_B, modality_B])
        scheduler: Any = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        scheduler.set_timesteps(num_inference_steps, device=device)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        shape = (b, self.unet.config.in_channels, h // factor, w // factor)
        x_B4hw = randn_tensor(shape, generator=generators, device=device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x_B4hw, x_B4hw]) if guided else x_B4hw, t)
            out = self(x_in, t.expand(x_in.shape[0]), modality_B, cond_B2HW).float()
            if guided:
                out_cond, out_uncond = out.chunk(2)
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
            x_B4hw = scheduler.step(out, t, x_B4hw).prev_sample
        image = self.vae.decode((x_B4hw / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return image.float().clamp(-1.0, 1.0)

    def save(self, folder: str | Path, info: GeneratorInfo | None = None) -> None:
        """The trained parts: controlnet/ (diffusers, safetensors) and modality_tokens.safetensors, plus
        univg_generator.json when `info` is given (what `univg pretrain` writes)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.controlnet.save_pretrained(str(folder / CONTROLNET), safe_serialization=True)
        save_file(self.modality_tokens.state_dict(), str(folder / TOKENS))
        if info is not None:
            write_generator_info(folder, info)

"""UniVG's own recipe, as an alternative generator: a ControlNet on a frozen Stable Diffusion 1.5.

    gen = ControlNetGenerator.from_sd15("/models/stable-diffusion-v1-5")   # a local diffusers folder
    noise_pred = gen(noisy_latents_B4hw, t_B, modality_B, cond_B2HW)      # ControlNet + frozen UNet
    image_B3HW = gen.sample(mask_B1HW, modality_B, seeds=[0, 1])           # DDIM in latent space

The SD folder is read from disk (unet/, vae/, scheduler/ in diffusers layout); nothing is downloaded.
Frozen: the VAE and the SD UNet. Trained: a ControlNet copied from the UNet's encoder (diffusers
`ControlNetModel.from_unet`) that sees the mask and the FOV (2 channels at image resolution), and a
modality embedding that stands in for the text prompt: one learned token of the UNet's cross-attention
width per modality slot (the last is the spare slot), so no text encoder is needed.

Status: model, training forward, sampling and save/load are here and tested with a tiny random SD
config; `univg pretrain` trains the pixel-space UNet (model.py), not this generator yet.

Tensor legend: B batch, H/W pixels, h/w latent pixels (H / 8 for SD), `latents_B4hw` VAE latents
(scaled), `cond_B2HW` mask and FOV in {0, 1}, `modality_B` int64, `t_B` timesteps.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from pretrain.model import NUM_MODALITY_SLOTS


class ControlNetGenerator(torch.nn.Module):
    """Frozen SD 1.5 VAE + UNet, trainable ControlNet (mask, FOV) and modality tokens."""

    def __init__(self, vae: Any, unet: Any, controlnet: Any, scheduler: Any) -> None:
        super().__init__()
        self.vae: Any = vae.requires_grad_(False).eval()
        self.unet: Any = unet.requires_grad_(False).eval()
        self.controlnet: Any = controlnet
        self.scheduler: Any = scheduler
        self.modality_tokens = torch.nn.Embedding(NUM_MODALITY_SLOTS, unet.config.cross_attention_dim)
        torch.nn.init.normal_(self.modality_tokens.weight, std=0.02)

    @classmethod
    def from_sd15(
        cls, sd_folder: str | Path, controlnet_folder: str | Path | None = None
    ) -> ControlNetGenerator:
        """Load SD 1.5 (unet/, vae/, scheduler/) from a local folder, safetensors only; the ControlNet is
        copied from the UNet, or loaded from `controlnet_folder` (a folder `save` wrote)."""
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
            controlnet = ControlNetModel.from_pretrained(str(Path(controlnet_folder) / "controlnet"))
        gen = cls(vae, unet, controlnet, scheduler)
        if controlnet_folder is not None:
            from safetensors.torch import load_file

            gen.modality_tokens.load_state_dict(
                load_file(str(Path(controlnet_folder) / "modality_tokens.safetensors"))
            )
        return gen

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [*self.controlnet.parameters(), *self.modality_tokens.parameters()]

    @torch.no_grad()
    def encode(self, image_B3HW: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled VAE latents (what the diffusion runs on)."""
        dist = self.vae.encode(image_B3HW.to(self.vae.dtype)).latent_dist
        return dist.sample(generator) * self.vae.config.scaling_factor

    def forward(
        self, noisy_B4hw: torch.Tensor, t_B: torch.Tensor, modality_B: torch.Tensor, cond_B2HW: torch.Tensor
    ) -> torch.Tensor:
        """The frozen UNet's noise (or v) prediction, steered by the ControlNet residuals."""
        tokens_B1D = self.modality_tokens(modality_B)[:, None, :]
        down, mid = self.controlnet(
            noisy_B4hw, t_B, encoder_hidden_states=tokens_B1D, controlnet_cond=cond_B2HW, return_dict=False
        )
        return self.unet(
            noisy_B4hw,
            t_B,
            encoder_hidden_states=tokens_B1D,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample

    @torch.no_grad()
    def sample(
        self,
        mask_B1HW: torch.Tensor,
        modality_B: torch.Tensor,
        seeds: Sequence[int],
        fov_B1HW: torch.Tensor | None = None,
        num_inference_steps: int = 25,
    ) -> torch.Tensor:
        """Images (B x 3 x H x W in [-1, 1]) by DDIM in latent space, one seed per sample."""
        b, _, h, w = mask_B1HW.shape
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if len(seeds) != b or h % factor or w % factor:
            raise ValueError(
                f"need one seed per mask and a size divisible by {factor} (got {b} masks {h}x{w})"
            )
        device = mask_B1HW.device
        fov_B1HW = torch.ones_like(mask_B1HW) if fov_B1HW is None else fov_B1HW
        cond_B2HW = torch.cat([mask_B1HW, fov_B1HW], dim=1)
        scheduler: Any = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        scheduler.set_timesteps(num_inference_steps, device=device)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        shape = (b, self.unet.config.in_channels, h // factor, w // factor)
        x_B4hw = randn_tensor(shape, generator=generators, device=device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = self(scheduler.scale_model_input(x_B4hw, t), t.expand(b), modality_B, cond_B2HW)
            x_B4hw = scheduler.step(out, t, x_B4hw).prev_sample
        image = self.vae.decode(x_B4hw / self.vae.config.scaling_factor).sample
        return image.float().clamp(-1.0, 1.0)

    def save(self, folder: str | Path) -> None:
        """The trained parts: controlnet/ (diffusers, safetensors) and modality_tokens.safetensors."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.controlnet.save_pretrained(str(folder / "controlnet"), safe_serialization=True)
        save_file(self.modality_tokens.state_dict(), str(folder / "modality_tokens.safetensors"))

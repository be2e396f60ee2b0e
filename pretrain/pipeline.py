"""Batched sampling: (mask, modality, seed) -> image, with DDIM or DPM-Solver and optional mask guidance.

    pipe = VesselPipeline.from_pretrained("runs/pretrain/checkpoints/step_0100000/generator")
    image_B3HW = pipe(mask_B1HW, modality_B, seeds=[0, 1, 2, 3])      # float32 in [-1, 1]

Each sample's starting noise comes from its own seed, so an image does not depend on what else is in
the batch. Guidance (guidance_scale != 1) runs the UNet on the mask and on an all-zero mask (what
the mask dropout trained) and extrapolates: out = uncond + scale * (cond - uncond).

Tensor legend: B batch, H/W pixels; `x_B3HW` the image being denoised, `mask_B1HW` / `fov_B1HW` in
{0, 1}, `modality_B` int64 modality index (len(MODALITIES) = spare slot).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from pretrain.model import IMAGE_CHANNELS, NUM_MODALITY_SLOTS, load_generator, sampling_scheduler, unet_input


class VesselPipeline:
    """A UNet2DModel and its training scheduler, turned into a mask-to-image sampler."""

    def __init__(
        self,
        unet: UNet2DModel,
        noise_scheduler: DDPMScheduler,
        sampler: str = "ddim",
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
    ) -> None:
        self.unet: Any = unet  # Any: diffusers' classes are opaque to the type checker
        self.noise_scheduler: Any = noise_scheduler
        self.sampler = sampler
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> VesselPipeline:
        """Load a generator folder; sampler, steps and guidance default to what it was trained with."""
        unet, scheduler, info = load_generator(folder, device)
        s = info.sampling
        return cls(unet, scheduler, s.sampler, s.num_inference_steps, s.guidance_scale)

    @torch.no_grad()
    def __call__(
        self,
        mask_B1HW: torch.Tensor,
        modality_B: torch.Tensor | Sequence[int],
        seeds: Sequence[int],
        fov_B1HW: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
    ) -> torch.Tensor:
        """Images (B x 3 x H x W, float32 in [-1, 1]) for masks, modalities and one seed per sample."""
        unet = self.unet
        device, dtype = unet.device, unet.dtype
        b, _, h, w = mask_B1HW.shape
        size = unet.config.sample_size
        want = tuple(size) if isinstance(size, list | tuple) else (size, size)
        if (h, w) != want:
            raise ValueError(f"mask is {h}x{w} px but the generator makes {want[0]}x{want[1]} px images")
        if len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for a batch of {b} masks: give one seed per mask")
        modality_B = torch.as_tensor(modality_B, dtype=torch.int64, device=device)
        if modality_B.shape != (b,) or not bool(
            ((modality_B >= 0) & (modality_B < NUM_MODALITY_SLOTS)).all()
        ):
            raise ValueError(f"modality must be {b} indices in 0..{NUM_MODALITY_SLOTS - 1}")
        mask_B1HW = mask_B1HW.to(device, dtype)
        fov_B1HW = torch.ones_like(mask_B1HW) if fov_B1HW is None else fov_B1HW.to(device, dtype)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        guided = scale != 1.0

        scheduler: Any = sampling_scheduler(self.noise_scheduler, sampler or self.sampler)
        scheduler.set_timesteps(num_inference_steps or self.num_inference_steps, device=device)
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        x_B3HW = randn_tensor((b, IMAGE_CHANNELS, h, w), generator=generators, device=device, dtype=dtype)
        x_B3HW = x_B3HW * scheduler.init_noise_sigma
        if guided:  # one UNet pass over [conditional; unconditional]
            cond_mask = torch.cat([mask_B1HW, torch.zeros_like(mask_B1HW)])
            cond_fov, cond_modality = torch.cat([fov_B1HW, fov_B1HW]), torch.cat([modality_B, modality_B])
        else:
            cond_mask, cond_fov, cond_modality = mask_B1HW, fov_B1HW, modality_B
        for t in scheduler.timesteps:
            x_in = torch.cat([x_B3HW, x_B3HW]) if guided else x_B3HW
            x_in = scheduler.scale_model_input(x_in, t)
            out = unet(unet_input(x_in, cond_mask, cond_fov), t, class_labels=cond_modality).sample
            if guided:
                out_cond, out_uncond = out.chunk(2)
                out = out_uncond + scale * (out_cond - out_uncond)
            x_B3HW = scheduler.step(out, t, x_B3HW).prev_sample
        return x_B3HW.float().clamp(-1.0, 1.0)

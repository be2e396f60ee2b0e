"""Few-shot generator adaptation (finetune.generator) on a tiny 32 px generator and 64 px fake shots.

The "pretrained" generator is a freshly initialised tiny UNet saved as a generator folder: what matters
here is what adaptation trains, writes and loads, not the images' quality.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from finetune.generator import (
    AdaptConfig,
    adapt_generator,
    load_adapted_pipeline,
    load_adapted_unet,
    synthesize_images,
)
from pretrain.config import DiffusionConfig, ModelConfig, SamplingConfig
from pretrain.model import (
    SPARE_MODALITY,
    GeneratorInfo,
    build_noise_scheduler,
    build_unet,
    read_generator_info,
    save_generator,
)
from pretrain.pipeline import VesselPipeline

MODALITIES = ("fundus", "xca", "dsa", "octa", "mra")
TINY = AdaptConfig(
    lora_rank=2,
    lora_alpha=2,
    max_steps=4,
    lr=1e-2,  # high, so a few steps visibly move the LoRA weights and the spare embedding row
    warmup_steps=0,
    batch_size=2,
    crop_side_px=48,  # crops of 38..60 px of the 64 px shots, resized to 32
    log_every_steps=2,
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generator folder, as a pretraining checkpoint would hold it."""
    folder = tmp_path_factory.mktemp("pretrain") / "checkpoints" / "step_0000010" / "generator"
    model = ModelConfig(image_size_px=32, block_out_channels=(8, 16), norm_num_groups=8, attention_head_dim=8)
    diffusion = DiffusionConfig(num_train_timesteps=100)
    torch.manual_seed(0)
    info = GeneratorInfo(model, diffusion, SamplingConfig(num_inference_steps=2), MODALITIES, step=10)
    save_generator(build_unet(model), build_noise_scheduler(diffusion), folder, info)
    return folder


def fake_shot(seed: int, colour: bool, with_fov: bool, side: int = 64) -> tuple[Any, Any, Any]:
    """Bright lines on a dark noisy background: (image, mask {0, 255}, fov or None) as load_case gives."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((side, side), np.uint8)
    for _ in range(4):
        p, q = rng.integers(0, side, 2), rng.integers(0, side, 2)
        cv2.line(mask, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), 255, thickness=3)
    grey = (40 + rng.normal(0, 8, mask.shape) + 0.6 * mask).clip(0, 255).astype(np.uint8)
    image = np.dstack([grey, grey // 2, grey // 3]) if colour else grey  # BGR
    fov = None
    if with_fov:
        fov = np.zeros_like(mask)
        cv2.circle(fov, (side // 2, side // 2), side // 2 - 1, 255, -1)
    return image, mask, fov


@pytest.fixture(scope="module")
def shots() -> list[tuple[Any, Any, Any]]:
    return [fake_shot(1, True, True), fake_shot(2, False, False), fake_shot(3, False, True)]


@pytest.fixture(scope="module")
def adapted(base: Path, shots: list[Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    before = sha256(base / "diffusion_pytorch_model.safetensors")
    out = adapt_generator(base, shots, TINY, tmp_path_factory.mktemp("adapt") / "lora", progress=False)
    assert sha256(base / "diffusion_pytorch_model.safetensors") == before  # the base is only read
    return out


def test_lora_adapter_files_record_and_only_adapter_weights_trained(adapted: Path, base: Path) -> None:
    names = {p.name for p in adapted.iterdir()}
    assert names == {"adapt.json", "adapt.log", "adapter_config.json", "adapter_model.safetensors"}
    record = json.loads((adapted / "adapt.json").read_text())
    assert record["status"] == "completed" and record["step"] == 4 and len(record["loss_history"]) == 4
    assert record["modality"] == "new" and record["modality_index"] == SPARE_MODALITY
    assert record["base_generator"] == str(base.resolve()) and record["base_info"]["step"] == 10
    assert record["config"]["lora_rank"] == 2 and record["wall_s"] > 0
    assert np.isfinite(record["fixed_batch_loss"]["start"]) and np.isfinite(record["fixed_batch_loss"]["end"])
    log = (adapted / "adapt.log").read_text()
    assert (
        "step 000002/000004 | loss " in log and "step 000004/000004 | loss " in log and " ms/step | " in log
    )

    weights = load_file(str(adapted / "adapter_model.safetensors"))
    lora = {k: v for k, v in weights.items() if ".lora_A." in k or ".lora_B." in k}
    embedding = {k: v for k, v in weights.items() if "class_embedding" in k}
    assert set(weights) == set(lora) | set(embedding) and len(embedding) == 1  # nothing else was saved
    assert record["num_trainable_params"] == sum(v.numel() for v in weights.values())  # nothing else trained
    assert any(".to_q." in k for k in lora) and any(".conv1." in k for k in lora)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())  # B moved off 0
    # only the spare row of the class embedding changed: no weight decay touches the other modalities
    (trained_rows,) = embedding.values()
    base_rows = load_file(str(base / "diffusion_pytorch_model.safetensors"))["class_embedding.weight"]
    assert torch.equal(trained_rows[:SPARE_MODALITY], base_rows[:SPARE_MODALITY])
    assert not torch.equal(trained_rows[SPARE_MODALITY], base_rows[SPARE_MODALITY])

    # unmerged, every base weight under the adapter is bit-identical to the base generator's
    model, _, _, _ = load_adapted_unet(adapted, merge=False)
    base_state = load_file(str(base / "diffusion_pytorch_model.safetensors"))
    for name, tensor in model.state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        key = key.replace("class_embedding.original_module.", "class_embedding.")
        assert torch.equal(tensor, base_state[key]), name


def test_adapted_pipeline_differs_from_base_and_stock_peft_loads_the_adapter(
    adapted: Path, base: Path
) -> None:
    from diffusers import UNet2DModel
    from peft import PeftModel

    pipe, modality = load_adapted_pipeline(adapted)
    assert modality == SPARE_MODALITY and pipe.num_inference_steps == 2
    mask_B1HW = torch.zeros(1, 1, 32, 32)
    mask_B1HW[..., 10:14, :] = 1
    adapted_image = pipe(mask_B1HW, [modality], seeds=[7])
    base_image = VesselPipeline.from_pretrained(base)(mask_B1HW, [modality], seeds=[7])
    assert (adapted_image - base_image).abs().max() > 1e-3
    assert torch.equal(pipe(mask_B1HW, [modality], seeds=[7]), adapted_image)  # same seed, same image

    # the adapter is a plain peft adapter: stock diffusers + peft give the same sample (unmerged)
    stock = PeftModel.from_pretrained(UNet2DModel.from_pretrained(str(base)), str(adapted)).eval()
    stock_image = VesselPipeline(stock, pipe.noise_scheduler, num_inference_steps=2)(  # type: ignore[arg-type]
        mask_B1HW, [modality], seeds=[7]
    )
    torch.testing.assert_close(stock_image, adapted_image, atol=2e-3, rtol=0)  # merged: float rounding


def test_synthesize_images_returns_uint8_at_each_mask_size(adapted: Path) -> None:
    pipe, modality = load_adapted_pipeline(adapted)
    masks = [
        fake_shot(4, False, False, side=48)[1][:, :40],
        fake_shot(5, False, False)[1],
        np.zeros((20, 24), np.uint8),
    ]
    fov = np.full((64, 64), 255, np.uint8)
    images = synthesize_images(pipe, modality, masks, [None, fov, None], seeds=[0, 1, 2], batch_size=2,
                               num_inference_steps=2, progress=False)  # fmt: skip
    assert [im.shape for im in images] == [(48, 40, 3), (64, 64, 3), (20, 24, 3)]
    assert all(im.dtype == np.uint8 for im in images)
    greys = synthesize_images(pipe, modality, masks, None, seeds=[0, 1, 2], batch_size=3, grey=True,
                              num_inference_steps=2, progress=False)  # fmt: skip
    assert [im.shape for im in greys] == [(48, 40), (64, 64), (20, 24)]
    # a sample depends on its own seed only, not on the batch it was drawn in
    expected = images[0].astype(np.float32).mean(axis=2)
    assert np.abs(greys[0].astype(np.float32) - expected).max() <= 1.0
    with pytest.raises(ValueError, match="seeds"):
        synthesize_images(pipe, modality, masks, None, seeds=[0], batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        synthesize_images(pipe, modality, [masks[0] > 0], None, seeds=[0], batch_size=2, progress=False)


def test_full_finetune_writes_a_generator_that_plain_diffusers_loads(
    base: Path, shots: list[Any], tmp_path: Path
) -> None:
    from diffusers import UNet2DModel

    from finetune.generator import _accelerator

    # an earlier stage of this process chose another precision: accelerate alone would refuse "no" now
    assert _accelerator("bf16").mixed_precision == "bf16"
    cfg = dataclasses.replace(TINY, method="full", max_steps=2, lr=1e-3, modality="xca")
    out = adapt_generator(base, shots, cfg, tmp_path / "full", progress=False)
    unet = UNet2DModel.from_pretrained(str(out / "generator"))
    assert unet.config.in_channels == 5 and unet.config.sample_size == 32
    assert read_generator_info(out / "generator").step == 12  # base steps + adaptation steps
    assert json.loads((out / "adapt.json").read_text())["mixed_precision"] == "no"
    trained = load_file(str(out / "generator" / "diffusion_pytorch_model.safetensors"))
    before = load_file(str(base / "diffusion_pytorch_model.safetensors"))
    assert set(trained) == set(before) and not torch.equal(
        trained["conv_in.weight"], before["conv_in.weight"]
    )
    pipe, modality = load_adapted_pipeline(out)
    assert modality == MODALITIES.index("xca")
    assert pipe(torch.ones(1, 1, 32, 32), [modality], seeds=[0]).shape == (1, 3, 32, 32)


def test_lora_loss_on_a_fixed_batch_goes_down(base: Path, shots: list[Any], tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, max_steps=30, batch_size=4, lr=3e-2, log_every_steps=10)
    out = adapt_generator(base, shots, cfg, tmp_path / "fit", progress=False)
    loss = json.loads((out / "adapt.json").read_text())["fixed_batch_loss"]
    assert loss["end"] < 0.85 * loss["start"], loss  # seeded: 1.089 -> 0.740 on CPU


# --- bad input: a ValueError naming it ---


def test_bad_generator_dir_is_named(shots: list[Any], tmp_path: Path, base: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"generator_dir=.*empty.*univg_generator\.json is missing"):
        adapt_generator(tmp_path / "empty", shots, TINY, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=r"generator_dir=.*no such folder"):
        adapt_generator(tmp_path / "nope", shots, TINY, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=r"is a checkpoint folder: pass .*generator"):
        adapt_generator(base.parent, shots, TINY, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing is written before the input checks pass


def test_bad_shots_are_named(base: Path, shots: list[Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="shots is empty"):
        adapt_generator(base, [], TINY, out, progress=False)
    image, mask, _ = shots[1]
    with pytest.raises(ValueError, match=r"shots\[1\] mask is empty"):
        adapt_generator(base, [shots[0], (image, np.zeros_like(mask), None)], TINY, out, progress=False)
    small = fake_shot(9, False, False, side=24)
    with pytest.raises(ValueError, match=r"shots\[0\] is 24x24 px: the generator makes 32x32 px images"):
        adapt_generator(base, [small], TINY, out, progress=False)
    with pytest.raises(ValueError, match=r"shots\[0\] mask must be uint8 of the image's size"):
        adapt_generator(base, [(image, mask[:, :50], None)], TINY, out, progress=False)
    with pytest.raises(ValueError, match=r"adapt\.modality='ultrasound' is not one of the generator's"):
        adapt_generator(base, shots, dataclasses.replace(TINY, modality="ultrasound"), out, progress=False)
    assert not out.exists()


def test_bad_config_and_adapter_dir_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"adapt\.lora_rank=0"):
        AdaptConfig(lora_rank=0)
    with pytest.raises(ValueError, match=r"adapt\.mixed_precision='fp32'"):
        AdaptConfig(mixed_precision="fp32")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"adapt\.crop_scale_range"):
        AdaptConfig(crop_scale_range=(1.5, 1.0))
    with pytest.raises(ValueError, match=r"adapt\.max_steps=0"):
        AdaptConfig(max_steps=0)
    with pytest.raises(ValueError, match=r"adapter_dir=.*adapt\.json is missing"):
        load_adapted_pipeline(tmp_path)


def test_non_finite_loss_stops_the_run_and_is_recorded(base: Path, shots: list[Any], tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, max_steps=3, lr=1e30, grad_clip=0.0)  # the first step wrecks the weights
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        adapt_generator(base, shots, cfg, tmp_path / "diverged", progress=False)
    record = json.loads((tmp_path / "diverged" / "adapt.json").read_text())
    assert record["status"] == "diverged" and "non-finite loss" in record["error"]
    assert not (tmp_path / "diverged" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="did not complete"):
        load_adapted_pipeline(tmp_path / "diverged")
    with pytest.raises(FileExistsError, match="overwrite=True"):  # a run folder is never silently replaced
        adapt_generator(base, shots, cfg, tmp_path / "diverged", progress=False)


def test_config_parses_from_yaml_style_dicts() -> None:
    from univg.config import config_from_dict

    cfg = config_from_dict(AdaptConfig, {"target_modules": ["to_q", "conv1"], "crop_scale_range": [0.5, 1.0]})
    assert cfg.target_modules == ("to_q", "conv1") and cfg.crop_scale_range == (0.5, 1.0)

"""Pretraining: the mask- and modality-conditioned diffusion generator, its DeepSpeed loop, checkpoints.

Modules: `config` (PretrainConfig and derived numbers), `model` (diffusers UNet2DModel + schedulers,
generator folders), `controlnet` (the other kind: a ControlNet on a frozen SD 1.5), `pipeline` (mask ->
image sampling), `checkpoint` (checkpoint folders), `train` (the loop), `cli` (`univg pretrain`,
`python -m pretrain`).
"""

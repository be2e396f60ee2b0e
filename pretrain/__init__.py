"""Pretraining: the mask- and modality-conditioned diffusion generator, its DeepSpeed loop, checkpoints.

Modules: `config` (PretrainConfig and derived numbers), `model` (diffusers UNet2DModel + schedulers,
generator folders), `pipeline` (mask -> image sampling), `checkpoint` (checkpoint folders), `train`
(the loop), `cli` (`univg pretrain`, `python -m pretrain`).
"""

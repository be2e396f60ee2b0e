"""Few-shot fine-tuning for a new vessel imaging task: split, segmenter, metrics, evaluation, inference.

Modules: `config` (typed settings), `split` (which real cases train and which score), `sampler` (network
input and patch sampling), `segmenter` (MONAI networks, the training loop, save/load), `metrics` (per-case
scores), `evaluate` (`univg evaluate`), `segment` (`univg segment`).

Nothing is imported here, so `univg evaluate` does not pay for torch start-up.
"""

"""The vessel segmenter: MONAI networks, the patch training loop (through accelerate), full-size
sliding-window prediction, the threshold, and the model folder.

    segmenter = train_segmenter(cfg, real_cases, synthetic=pairs, model_dir=run / "model")
    prob_HW = segmenter.predict_proba(read_image(path))      # float32 [0, 1], the image's size
    mask_HW = segmenter.predict(read_image(path))            # uint8 {0, 255}
    segmenter = Segmenter.load(run / "model")

`real_cases` are (image, mask, fov or None) as `data_engine.ingest.load_case` gives; `synthetic` is any
iterable of (image, mask) pairs in the same uint8 conventions (a list, or a generator fed from shards).

Model folder: `model.safetensors` (the network's state dict) and `config.json` (format tag, the
`SegmenterConfig`, the threshold and how it was chosen, and a training record). Loading reads only these
two files, with safetensors and json: nothing is unpickled.

Legend: B batch of patches, 3 = RGB input channels, 1 = vessel logit / probability, P patch side,
H x W image (px).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from accelerate import Accelerator
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss, SoftclDiceLoss
from monai.networks.nets import AttentionUnet, FlexibleUNet, SegResNet, SwinUNETR, UNet
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from finetune.config import LossConfig, NetConfig, SegmenterConfig
from finetune.field import decide as decide_field
from finetune.polarity import decide as decide_polarity
from finetune.sampler import PatchPool, check_scale, prepare_image, prepare_mask, resize_by
from univg.config import ConfigError, config_from_dict, to_dict

log = logging.getLogger(__name__)

MODEL_FORMAT = "univg-segmenter/1"  # written into config.json; loading refuses anything else
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
IN_CHANNELS = 3  # RGB, grey replicated (finetune.sampler.prepare_image)

RealCase = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # (image, mask, fov or None), load_case's form
SyntheticPair = tuple[np.ndarray, np.ndarray]  # (image, mask)


class CorpusPair(NamedTuple):
    """An engine-corpus pair rehearsed in a synthetic stream: it goes into the network in the polarity the
    pretrained start learned it in, where the task's own images may go in inverted (finetune/polarity.py)."""

    image: np.ndarray
    mask: np.ndarray


def network_input(image: np.ndarray, max_side_px: int, inverted: bool = False) -> np.ndarray:
    """prepare_image's float32 3xHxW input, negated when `inverted`: each channel is z-scored, so that is
    the input of the inverted image (the task's polarity choice, finetune/polarity.py)."""
    input_3HW = prepare_image(image, max_side_px)
    return np.negative(input_3HW, out=input_3HW) if inverted else input_3HW


# --- networks ---


def build_network(cfg: NetConfig) -> nn.Module:
    """The network `cfg.arch` names: 3 input channels (RGB), 1 output channel (vessel logit), 2D."""
    c = cfg.base_channels
    channels = tuple(c * 2**i for i in range(cfg.num_levels))
    strides = (2,) * (cfg.num_levels - 1)
    if cfg.arch == "unet":
        return UNet(
            spatial_dims=2,
            in_channels=IN_CHANNELS,
            out_channels=1,
            channels=channels,
            strides=strides,
            num_res_units=2,
            norm=("instance", {"affine": True}),
            dropout=cfg.dropout,
        )
    if cfg.arch == "attention_unet":
        return AttentionUnet(
            spatial_dims=2,
            in_channels=IN_CHANNELS,
            out_channels=1,
            channels=channels,
            strides=strides,
            dropout=cfg.dropout,
        )
    if cfg.arch == "swin_unetr":
        return SwinUNETR(
            in_channels=IN_CHANNELS,
            out_channels=1,
            feature_size=c,
            spatial_dims=2,
            drop_rate=cfg.dropout,
        )
    if cfg.arch == "resnet_unet":
        return FlexibleUNet(
            in_channels=IN_CHANNELS,
            out_channels=1,
            backbone=cfg.backbone,
            pretrained=False,  # random init: no download, and ImageNet weights need not suit vessels
            decoder_channels=(16 * c, 8 * c, 4 * c, 2 * c, c),
            spatial_dims=2,
            dropout=cfg.dropout,
        )
    if cfg.arch == "segresnet":
        # blocks_down has num_levels entries; SegResNet halves the resolution between them
        blocks_down = (1, 2, 2, 4, 4, 4)[: cfg.num_levels]
        return SegResNet(
            spatial_dims=2,
            init_filters=c,
            in_channels=IN_CHANNELS,
            out_channels=1,
            dropout_prob=cfg.dropout or None,
            blocks_down=blocks_down,
            blocks_up=(1,) * (cfg.num_levels - 1),
        )
    raise ValueError(
        f"net.arch={cfg.arch!r} is not a known network"
    )  # Literal-typed: config rejects it first


class SegmentationLoss(nn.Module):
    """dice_weight * soft Dice + bce_weight * BCE + cldice_weight * soft clDice, from logits.

    Dice is computed over the whole batch as one volume (MONAI `batch=True`): a patch without vessel then
    does not add a constant penalty, which matters with sparse targets.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dice = DiceLoss(sigmoid=True, batch=True)
        self.bce = nn.BCEWithLogitsLoss()
        self.cldice = SoftclDiceLoss(iter_=cfg.cldice_iters, sigmoid=True) if cfg.cldice_weight > 0 else None

    def forward(self, logits_B1PP: torch.Tensor, target_B1PP: torch.Tensor) -> torch.Tensor:
        logits_B1PP = logits_B1PP.float()
        loss = self.cfg.dice_weight * self.dice(logits_B1PP, target_B1PP)
        loss = loss + self.cfg.bce_weight * self.bce(logits_B1PP, target_B1PP)
        if self.cldice is not None:
            loss = loss + self.cfg.cldice_weight * self.cldice(logits_B1PP, target_B1PP)
        return loss


# --- the trained model ---


@dataclass
class Segmenter:
    """A trained network with its config and threshold; predicts full-size probability maps and masks."""

    network: nn.Module
    cfg: SegmenterConfig
    threshold: float = 0.5  # probability above which a pixel is vessel
    record: dict[str, Any] = field(default_factory=dict)  # how it was trained (steps, loss, threshold source)
    mixed_precision: str = "no"  # autocast dtype used for inference on GPU: "no", "fp16" or "bf16"

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def predict_proba(self, image: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """uint8 HxW grey or HxWx3 BGR -> float32 HxW vessel probability (sliding window at full size).

        `scale` resizes the image for the network first (the input cap applies after it) and the probability
        comes back at the image's own size: for images whose vessels are wider or thinner in pixels than the
        training shots' (another resolution), scale = the shots' pixel size over the image's."""
        check_scale(scale, "scale")
        original_hw = image.shape[:2]
        input_3HW = network_input(resize_by(image, scale), self.cfg.input.max_side_px, self.inverted)
        x_13HW = torch.from_numpy(input_3HW)[None].to(self.device)
        window = self.cfg.window_size_px
        self.network.eval()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.mixed_precision)
        with (
            torch.inference_mode(),
            torch.autocast(
                device_type=self.device.type,
                dtype=dtype,
                enabled=dtype is not None and self.device.type == "cuda",
            ),
        ):
            flips: list[tuple[int, ...]] = [()]
            if self.cfg.infer.flip_tta:
                flips += [(3,), (2,), (2, 3)]  # horizontal, vertical, both
            turns = [0, 1] if self.cfg.infer.rot90_tta else [0]  # quarter turns, each with every flip
            prob_11HW = torch.zeros_like(x_13HW[:, :1], dtype=torch.float32)
            for turn, dims in itertools.product(turns, flips):
                x = torch.rot90(x_13HW, turn, (2, 3)) if turn else x_13HW
                x = torch.flip(x, dims) if dims else x
                logits_11HW = sliding_window_inference(
                    x,
                    roi_size=(window, window),
                    sw_batch_size=self.cfg.infer.window_batch_size,
                    predictor=self.network,
                    overlap=self.cfg.infer.overlap,
                    mode=self.cfg.infer.blend,
                    padding_mode="constant",
                    cval=0.0,  # the normalised image mean, as training patches are padded
                )
                assert isinstance(logits_11HW, torch.Tensor)
                prob = torch.sigmoid(logits_11HW.float())
                prob = torch.flip(prob, dims) if dims else prob
                prob_11HW += torch.rot90(prob, -turn, (2, 3)) if turn else prob
            prob_11HW /= len(turns) * len(flips)
        prob_HW = prob_11HW[0, 0].cpu().numpy()
        if prob_HW.shape != original_hw:
            prob_HW = cv2.resize(prob_HW, (original_hw[1], original_hw[0]), interpolation=cv2.INTER_LINEAR)
        return np.clip(prob_HW, 0.0, 1.0).astype(np.float32)

    @property
    def inverted(self) -> bool:
        """Whether images go into the network inverted (finetune/polarity.py); decided when the model was
        trained (`input.polarity`), in its record. A model saved before the choice existed reads as is."""
        decision = self.record.get("input_polarity")
        return bool(decision.get("inverted")) if isinstance(decision, dict) else False

    @property
    def field_from_image(self) -> bool:
        """Whether outputs are cleared outside the field of view estimated from each image
        (finetune/field.py); decided when the model was trained (`infer.field_from_image`), in its record."""
        decision = self.record.get("field_from_image")
        return bool(decision.get("used")) if isinstance(decision, dict) else False

    def predict_output(self, image: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """predict_proba, then 0 outside the field estimated from the image when `field_from_image`: the
        probability map that masks, probability files and scores are made from."""
        prob_HW = self.predict_proba(image, scale)
        if self.field_from_image:
            from finetune.field import clear_outside

            prob_HW = clear_outside(prob_HW, image)
        return prob_HW

    def predict(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxW grey or HxWx3 BGR -> uint8 HxW {0, 255} mask at this segmenter's threshold."""
        return np.where(self.predict_output(image) > self.threshold, np.uint8(255), np.uint8(0))

    def save(self, model_dir: str | Path) -> Path:
        """Write model.safetensors and config.json into model_dir (created); returns model_dir."""
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.network.state_dict().items()}
        save_file(state, str(model_dir / WEIGHTS_FILE), metadata={"format": MODEL_FORMAT})
        return self.save_config(model_dir)

    def save_config(self, model_dir: str | Path) -> Path:
        """(Re)write config.json (threshold, config, record) beside the weights, atomically."""
        model_dir = Path(model_dir)
        meta = {
            "format": MODEL_FORMAT,
            "threshold": self.threshold,
            "in_channels": IN_CHANNELS,
            "segmenter": to_dict(self.cfg),
            "record": self.record,
        }
        tmp = model_dir / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        tmp.replace(model_dir / CONFIG_FILE)
        return model_dir

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device | None = None) -> Segmenter:
        """Load a model folder written by `save` (or a run folder holding `model/`)."""
        model_dir = Path(model_dir)
        if not (model_dir / CONFIG_FILE).is_file() and (model_dir / "model" / CONFIG_FILE).is_file():
            model_dir = model_dir / "model"
        config_path, weights_path = model_dir / CONFIG_FILE, model_dir / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: a segmenter folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                    "(pass the run folder or its model/ folder)"
                )
        try:
            meta = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
            raise ValueError(
                f"{config_path}: format {meta.get('format') if isinstance(meta, dict) else None!r} "
                f"is not {MODEL_FORMAT!r}; not a univg segmenter folder"
            )
        try:
            cfg = config_from_dict(SegmenterConfig, meta["segmenter"])
        except (ConfigError, ValueError, KeyError) as e:
            raise ValueError(f"{config_path}: segmenter config does not parse: {e}") from e
        network = build_network(cfg.net)
        state = load_file(str(weights_path))
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{weights_path}: weights do not fit net {to_dict(cfg.net)}: {e}") from e
        device = torch.device(device) if device is not None else default_device()
        network.to(device).eval()
        mixed = _resolve_mixed_precision(cfg.mixed_precision) if device.type == "cuda" else "no"
        threshold = float(meta.get("threshold", cfg.infer.threshold))
        return cls(network, cfg, threshold, dict(meta.get("record", {})), mixed)


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


# --- threshold ---


def _inside(fov: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean HxW of the pixels that count: the FOV where there is one, else every pixel."""
    return np.ones(shape, bool) if fov is None else fov > 0


# Candidate thresholds (probability); 0.05 steps are finer than the threshold's effect on Dice varies.
THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))


def choose_threshold(
    probs: Sequence[np.ndarray], labels: Sequence[np.ndarray], fovs: Sequence[np.ndarray | None]
) -> tuple[float, float]:
    """(threshold, Dice) maximising Dice pooled over the given cases' pixels (inside each FOV).

    Ties go to the threshold nearest 0.5. Meant for the training shots only: choosing it on test labels
    would leak them into the score.
    """
    edges = np.array(THRESHOLDS)
    tp = np.zeros(len(edges))
    pred_pos = np.zeros(len(edges))
    label_pos = 0.0
    for prob, label, fov in zip(probs, labels, fovs, strict=True):
        inside = _inside(fov, label.shape)
        p = prob[inside]
        y = label[inside] > 0
        # prediction at threshold t is p > t; counts for every t from the sorted probabilities
        p_sorted = np.sort(p)
        p_pos_sorted = np.sort(p[y])
        pred_pos += p.size - np.searchsorted(p_sorted, edges, side="right")
        tp += p_pos_sorted.size - np.searchsorted(p_pos_sorted, edges, side="right")
        label_pos += float(y.sum())
    denominator = pred_pos + label_pos
    dice = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)
    best = float(dice.max())
    candidates = [i for i in range(len(edges)) if dice[i] >= best - 1e-12]
    i = min(candidates, key=lambda j: abs(edges[j] - 0.5))
    return float(edges[i]), float(dice[i])


def pooled_dice(
    probs: Sequence[np.ndarray], labels: Sequence[np.ndarray], fovs: Sequence[np.ndarray | None], t: float
) -> float:
    """Dice of (probability > t) against the labels, pixels pooled over the cases (inside each FOV)."""
    tp = pred_pos = label_pos = 0
    for prob, label, fov in zip(probs, labels, fovs, strict=True):
        inside = _inside(fov, label.shape)
        pred, truth = (prob > t) & inside, (label > 0) & inside
        tp += int(np.count_nonzero(pred & truth))
        pred_pos += int(np.count_nonzero(pred))
        label_pos += int(np.count_nonzero(truth))
    return 2 * tp / (pred_pos + label_pos) if pred_pos + label_pos else 1.0


def area_threshold(
    labels: Sequence[np.ndarray],
    label_fovs: Sequence[np.ndarray | None],
    probs: Sequence[np.ndarray],
    prob_fovs: Sequence[np.ndarray | None],
) -> tuple[float, float]:
    """(threshold, fraction): the threshold at which the vessel fraction predicted over unlabelled images
    (`probs`, pooled inside their FOVs) equals the labelled fraction over the shots (`labels`, pooled inside
    theirs), clipped to the candidate range of THRESHOLDS. Reads the shots' labels only."""
    if not labels or not probs:
        raise ValueError("area_threshold: needs at least one labelled shot and one unlabelled image")
    labelled = inside_total = 0
    for label, fov in zip(labels, label_fovs, strict=True):
        inside = _inside(fov, label.shape)
        labelled += int(np.count_nonzero((label > 0) & inside))
        inside_total += int(np.count_nonzero(inside))
    fraction = labelled / max(1, inside_total)
    pooled = np.concatenate(
        [(p if f is None else p[f > 0]).ravel() for p, f in zip(probs, prob_fovs, strict=True)]
    )
    keep = int(round(fraction * pooled.size))  # pixels predicted as vessel
    if keep <= 0:
        t = THRESHOLDS[-1]
    elif keep >= pooled.size:
        t = THRESHOLDS[0]
    else:
        # midway between the keep-th and the (keep+1)-th largest value: keep pixels lie above it
        part = np.partition(pooled, [pooled.size - keep - 1, pooled.size - keep])
        t = 0.5 * float(part[pooled.size - keep - 1]) + 0.5 * float(part[pooled.size - keep])
    return float(np.clip(t, THRESHOLDS[0], THRESHOLDS[-1])), fraction


# --- training ---


def _lr_at(step: int, cfg: SegmenterConfig) -> float:
    """Linear warm-up to optim.lr over warmup_steps, then cosine decay to 0 at max_steps."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps)
    return o.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _check_real_case(i: int, case: RealCase) -> None:
    if not isinstance(case, tuple | list) or len(case) != 3:
        raise ValueError(f"real case {i}: expected (image, mask, fov or None), got {type(case).__name__}")
    image, mask, fov = case
    if not isinstance(mask, np.ndarray) or mask.shape != image.shape[:2]:
        raise ValueError(
            f"real case {i}: mask shape {getattr(mask, 'shape', None)} does not match image {image.shape[:2]}"
        )
    if fov is not None and fov.shape != mask.shape:
        raise ValueError(f"real case {i}: fov shape {fov.shape} does not match mask {mask.shape}")


class _SyntheticFeed:
    """Pulls synthetic pairs into a ring pool; a re-iterable source (a list) larger than the pool is
    cycled, a one-shot iterator is read until it ends and the pool then keeps what it holds."""

    def __init__(
        self, source: Iterable[SyntheticPair], pool: PatchPool, max_side_px: int, inverted: bool = False
    ) -> None:
        self.source = source
        self.pool = pool
        self.max_side_px = max_side_px
        self.inverted = inverted  # the task's pairs go in inverted; rehearsed CorpusPairs never do
        self.iterator: Iterator[SyntheticPair] | None = iter(source)
        self.cyclic = self.iterator is not source
        self.pulled_this_pass = 0

    def pull(self, count: int) -> int:
        added = 0
        while added < count and self.iterator is not None:
            try:
                pair = next(self.iterator)
            except StopIteration:
                # restart only a re-iterable source the pool cannot hold at once (else it is all in already)
                big = self.pool.max_cases is not None and self.pulled_this_pass > self.pool.max_cases
                self.iterator = iter(self.source) if (self.cyclic and big) else None
                self.pulled_this_pass = 0
                continue
            self._add(pair)
            added += 1
        return added

    def _add(self, pair: SyntheticPair) -> None:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(
                f"synthetic pair {self.pool.num_added}: expected (image, mask), got {type(pair).__name__}"
            )
        image, mask = pair
        if (
            not isinstance(image, np.ndarray)
            or not isinstance(mask, np.ndarray)
            or mask.shape != image.shape[:2]
        ):
            raise ValueError(
                f"synthetic pair {self.pool.num_added}: image {getattr(image, 'shape', None)} and mask "
                f"{getattr(mask, 'shape', None)} must be arrays of the same height and width"
            )
        inverted = self.inverted and not isinstance(pair, CorpusPair)
        input_3HW = network_input(image, self.max_side_px, inverted)
        self.pool.add(input_3HW, prepare_mask(mask, *input_3HW.shape[1:]))
        self.pulled_this_pass += 1


def _pseudo_label(
    network: nn.Module,
    cfg: SegmenterConfig,
    mixed: str,
    shots: Sequence[RealCase],
    unlabelled: Sequence[tuple[np.ndarray, np.ndarray | None]],
    pool: PatchPool,
    choices: dict[str, Any],
) -> dict[str, Any]:
    """Label the unlabelled images with the network as it is now and add them to `pool`: the threshold is
    the one best on the shots at this moment (choose_threshold), or with pseudo.threshold_rule "area" the one
    at which the images' vessel fraction equals the shots' labelled fraction (area_threshold, class-balanced
    self-training: the labels then carry the task's share of vessel); pixels outside an image's FOV are
    background. Mirrored averaging when cfg.pseudo.flip_tta, else one plain pass: infer.flip_tta and
    infer.rot90_tta, which are for scoring, play no part, so a saved model re-scored with or without them was
    trained the same way. `choices` holds the training's decisions, as the record keeps them:
    "field_from_image" (finetune.field.decide; when it is used, the maps are cleared outside each image's
    estimated field first, as the trained segmenter's outputs will be, so an edge there is never taught as
    vessel) and "input_polarity" (finetune/polarity.py; the images go in as the trained segmenter's will).
    Returns what was done (threshold, the shots' Dice there, vessel fraction, time)."""
    started = time.perf_counter()
    labeller = replace(cfg, infer=replace(cfg.infer, flip_tta=cfg.pseudo.flip_tta, rot90_tta=False))
    probe = Segmenter(network, labeller, cfg.infer.threshold, dict(choices), mixed_precision=mixed)
    shot_probs = [probe.predict_output(image) for image, _m, _f in shots]
    shot_masks = [mask for _i, mask, _f in shots]
    shot_fovs = [fov for _i, _m, fov in shots]
    probs = [probe.predict_output(image) for image, _fov in unlabelled]
    if cfg.pseudo.threshold_rule == "area":
        threshold, _fraction = area_threshold(shot_masks, shot_fovs, probs, [fov for _i, fov in unlabelled])
        shots_dice = pooled_dice(shot_probs, shot_masks, shot_fovs, threshold)
    else:
        threshold, shots_dice = choose_threshold(shot_probs, shot_masks, shot_fovs)
    vessel = inside_total = 0
    for (image, fov), prob in zip(unlabelled, probs, strict=True):
        mask = prob > threshold
        inside = _inside(fov, mask.shape)
        mask &= inside
        vessel += int(np.count_nonzero(mask))
        inside_total += int(np.count_nonzero(inside))
        input_3HW = network_input(image, cfg.input.max_side_px, probe.inverted)
        pool.add(input_3HW, prepare_mask(mask, *input_3HW.shape[1:]))
    return {
        "num_images": len(unlabelled),
        "threshold": threshold,
        "threshold_rule": cfg.pseudo.threshold_rule,
        "shots_dice": shots_dice,
        "vessel_fraction": vessel / max(1, inside_total),
        "batch_fraction": cfg.pseudo.batch_fraction,
        "mirrored": cfg.pseudo.flip_tta,
        "field_cleared": probe.field_from_image,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def load_initial_weights(model_dir: str | Path, cfg: SegmenterConfig) -> Segmenter:
    """The segmenter in model_dir, checked to have cfg's network (ValueError naming what differs)."""
    start = Segmenter.load(model_dir, device="cpu")
    if start.cfg.net != cfg.net:
        raise ValueError(
            f"{model_dir}: its network {to_dict(start.cfg.net)} is not this run's {to_dict(cfg.net)}; "
            "pretrain with the same profile's segmenter.net"
        )
    return start


def _start_reader(
    init_from: str | Path | None,
    cfg: SegmenterConfig,
    field_choice: dict[str, Any],
    mixed: str,
    device: torch.device,
) -> Callable[[np.ndarray, bool], np.ndarray] | None:
    """The pretrained start as finetune.polarity.decide reads a shot: (image, inverted) -> its probability
    map, one plain pass, cleared outside the field as the trained segmenter's outputs will be. None without
    a start, or when input.polarity is forced. Loaded without touching torch's global random state, so the
    training that follows is the same whichever way the decision goes."""
    if init_from is None or cfg.input.polarity != "auto":
        return None
    with torch.random.fork_rng(devices=[]):
        start = load_initial_weights(init_from, cfg)
    start.network.to(device)
    plain = replace(cfg, infer=replace(cfg.infer, flip_tta=False, rot90_tta=False))

    def read(image: np.ndarray, inverted: bool) -> np.ndarray:
        record = {"field_from_image": field_choice, "input_polarity": {"inverted": inverted}}
        return Segmenter(start.network, plain, cfg.infer.threshold, record, mixed).predict_output(image)

    return read


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak_kib / (2**30 if sys.platform == "darwin" else 2**20)


def train_segmenter(
    cfg: SegmenterConfig,
    real_cases: Sequence[RealCase],
    synthetic: Iterable[SyntheticPair] | None = None,
    model_dir: str | Path | None = None,
    progress: bool = True,
    on_log: Callable[[dict[str, float]], None] | None = None,
    init_from: str | Path | None = None,
    unlabelled: Sequence[tuple[np.ndarray, np.ndarray | None]] = (),
) -> Segmenter:
    """Train one segmenter on real cases and (optionally) synthetic pairs; save it to model_dir if given.

    Each batch holds round(batch_size * share) synthetic patches when synthetic pairs are given (all of
    them when there are no real cases), the rest real; the share is patch.synthetic_fraction, moving
    linearly to patch.synthetic_fraction_end by the last step when that is set. The threshold is then
    tuned on the real training cases (infer.tune_threshold). Runs on whatever `accelerate` sets up: CPU,
    one GPU, or several processes under `accelerate launch` (batch_size is per process). `init_from`: a
    segmenter folder with the same network config whose weights training starts from. `unlabelled`:
    (image, fov or None) of the task's unlabelled images, for self-training when cfg.pseudo.enabled (their
    pseudo-labels join the batches after cfg.pseudo.start_fraction of the steps; `_pseudo_label`).
    """
    if not real_cases and synthetic is None:
        raise ValueError("train_segmenter: no training data (no real cases and no synthetic pairs)")
    for i, case in enumerate(real_cases):
        _check_real_case(i, case)
    if init_from is not None and cfg.optim.pretrained_lr > 0:  # the rate of its own for a pretrained start
        cfg = replace(cfg, optim=replace(cfg.optim, lr=cfg.optim.pretrained_lr))
    started = time.perf_counter()
    mixed = _resolve_mixed_precision(cfg.mixed_precision)
    accelerator = Accelerator(mixed_precision=mixed)
    main = accelerator.is_main_process

    # Two decisions made once on the shots before training, so that every map the segmenter is taught or
    # judged by afterwards sees the same inputs: cleared outside each image's estimated field of view
    # (finetune/field.py)? inverted, to match the polarity the pretrained start reads best
    # (finetune/polarity.py)?
    field_choice = decide_field(
        cfg.infer.field_from_image, [(image, mask) for image, mask, _fov in real_cases]
    )
    start_reader = _start_reader(init_from, cfg, field_choice, mixed, accelerator.device)
    polarity_choice = decide_polarity(cfg.input.polarity, real_cases, start_reader)
    choices = {"field_from_image": field_choice, "input_polarity": polarity_choice}
    inverted = bool(polarity_choice["inverted"])

    # real cases -> pool once; synthetic pairs stream through a ring pool
    real_pool = PatchPool()
    for image, mask, _fov in real_cases:
        input_3HW = network_input(image, cfg.input.max_side_px, inverted)
        real_pool.add(input_3HW, prepare_mask(mask, *input_3HW.shape[1:]))
    synthetic_pool = PatchPool(max_cases=cfg.patch.synthetic_pool_size)
    feed = None
    if synthetic is not None:
        feed = _SyntheticFeed(synthetic, synthetic_pool, cfg.input.max_side_px, inverted)
        feed.pull(cfg.patch.synthetic_pool_size)
        if len(synthetic_pool) == 0 and len(real_pool) == 0:
            raise ValueError(
                "train_segmenter: the synthetic source gave no pairs and there are no real cases"
            )
    batch = cfg.patch.batch_size

    def synthetic_in_batch(at_step: int) -> int:
        if not len(synthetic_pool):
            return 0
        if len(real_pool) == 0:
            return batch
        return round(batch * cfg.patch.synthetic_share(at_step, cfg.optim.max_steps))

    pseudo_pool = PatchPool()
    pseudo_step = None  # the step at which the unlabelled images get their pseudo-labels
    if cfg.pseudo.enabled and unlabelled and real_cases:
        pseudo_step = max(1, round(cfg.pseudo.start_fraction * cfg.optim.max_steps))
    elif cfg.pseudo.enabled:
        log.warning(
            "pseudo.enabled but %s: training without pseudo-labels",
            "no unlabelled image was given" if not unlabelled else "no labelled shot sets the threshold",
        )
    pseudo_record: dict[str, Any] | None = None

    def pseudo_in_batch(num_real: int) -> int:  # taken out of the real shots' share, at least one left
        if not len(pseudo_pool):
            return 0
        return min(round(batch * cfg.pseudo.batch_fraction), max(0, num_real - 1))

    num_synthetic = synthetic_in_batch(0)
    num_real = batch - num_synthetic
    num_synthetic_last = synthetic_in_batch(cfg.optim.max_steps - 1)

    torch.manual_seed(cfg.seed)  # same initial weights on every process
    network = build_network(cfg.net)
    if init_from is not None:
        start = load_initial_weights(init_from, cfg)
        network.load_state_dict(start.network.state_dict())
    optimizer = torch.optim.AdamW(network.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    network, optimizer = accelerator.prepare(network, optimizer)
    anchor = (  # the pretrained weights that optim.anchor_decay pulls back toward
        [p.detach().clone() for p in network.parameters()]
        if init_from is not None and cfg.optim.anchor_decay > 0
        else None
    )
    ema = None  # the weight average that replaces the last step's weights (optim.ema_decay > 0)
    loss_fn = SegmentationLoss(cfg.loss)
    rng = np.random.default_rng([cfg.seed, accelerator.process_index])  # patches differ per process
    num_params = sum(p.numel() for p in network.parameters())
    if main:
        log.info(
            "segmenter %s: %.2fM parameters | %d real cases, %d synthetic in pool | patch %d px | "
            "batch %d per process (%d real + %d synthetic%s) x %d processes = %d | "
            "%d steps at peak lr %.1e%s | %s | mixed precision %s",
            cfg.net.arch,
            num_params / 1e6,
            len(real_pool),
            len(synthetic_pool),
            cfg.patch.patch_size_px,
            batch,
            num_real,
            num_synthetic,
            "" if num_synthetic_last == num_synthetic else f", {num_synthetic_last} by the last step",
            accelerator.num_processes,
            batch * accelerator.num_processes,
            cfg.optim.max_steps,
            cfg.optim.lr,
            "" if init_from is None else " from pretrained weights",
            accelerator.device,
            mixed,
        )

    history: list[dict[str, float]] = []
    step = 0
    synthetic_patches = 0
    pseudo_patches = 0
    interval_losses: list[float] = []
    interval_start = time.perf_counter()
    network.train()
    bar = tqdm(
        total=cfg.optim.max_steps,
        desc=f"train {cfg.net.arch}",
        disable=not (progress and main),
        unit="step",
        dynamic_ncols=True,
    )
    with logging_redirect_tqdm():
        while step < cfg.optim.max_steps:
            if step == pseudo_step:
                pseudo_record = _pseudo_label(
                    accelerator.unwrap_model(network),
                    cfg,
                    mixed,
                    real_cases,
                    unlabelled,
                    pseudo_pool,
                    choices,
                )
                pseudo_record["at_step"] = step
                network.train()
                if main:
                    log.info(
                        "step %06d: pseudo-labels for %d unlabelled image(s) at threshold %.2f (rule %s; the "
                        "shots' Dice there %.4f; vessel fraction %.4f; %.0f s)",
                        step,
                        pseudo_record["num_images"],
                        pseudo_record["threshold"],
                        pseudo_record["threshold_rule"],
                        pseudo_record["shots_dice"],
                        pseudo_record["vessel_fraction"],
                        pseudo_record["wall_s"],
                    )
            # data: real, synthetic and pseudo-labelled patches in one batch (shares may follow a schedule)
            num_synthetic = synthetic_in_batch(step)
            num_real = batch - num_synthetic
            num_pseudo = pseudo_in_batch(num_real)
            num_real -= num_pseudo
            synthetic_patches += num_synthetic
            pseudo_patches += num_pseudo
            parts = []
            if num_pseudo:
                parts.append(
                    pseudo_pool.sample(
                        rng, num_pseudo, cfg.patch.patch_size_px, cfg.patch.foreground_fraction, cfg.augment
                    )
                )
            if num_real:
                parts.append(
                    real_pool.sample(
                        rng, num_real, cfg.patch.patch_size_px, cfg.patch.foreground_fraction, cfg.augment
                    )
                )
            if num_synthetic:
                if feed is not None:
                    feed.pull(cfg.patch.synthetic_refresh_per_step)
                parts.append(
                    synthetic_pool.sample(
                        rng,
                        num_synthetic,
                        cfg.patch.patch_size_px,
                        cfg.patch.foreground_fraction,
                        cfg.augment,
                    )
                )
            image_B3PP = torch.from_numpy(np.concatenate([p[0] for p in parts])).to(accelerator.device)
            mask_B1PP = torch.from_numpy(np.concatenate([p[1] for p in parts])).to(accelerator.device)

            lr = _lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits_B1PP = network(image_B3PP)
            loss = loss_fn(logits_B1PP, mask_B1PP)
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"non-finite loss {loss.item()} at step {step}: stopping (lower optim.lr?)"
                )
            accelerator.backward(loss)
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            gnorm = float(accelerator.clip_grad_norm_(network.parameters(), max_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if anchor is not None:
                pull = min(1.0, lr * cfg.optim.anchor_decay)
                with torch.no_grad():
                    for param, start_value in zip(network.parameters(), anchor, strict=True):
                        param.lerp_(start_value, pull)
            step += 1
            if cfg.optim.ema_decay > 0 and step > cfg.optim.ema_start_step:
                if ema is None:  # starts as a copy of the weights after step ema_start_step + 1
                    ema = AveragedModel(
                        accelerator.unwrap_model(network),
                        multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema_decay),
                        use_buffers=True,
                    )
                ema.update_parameters(accelerator.unwrap_model(network))
            bar.update(1)

            interval_losses.append(float(loss.detach()))
            if step % cfg.log_every_steps == 0 or step == cfg.optim.max_steps:
                elapsed = time.perf_counter() - interval_start
                ms_per_step = 1000 * elapsed / len(interval_losses)
                entry = {
                    "step": step,
                    "loss": float(np.mean(interval_losses)),
                    "lr": lr,
                    "gnorm": gnorm,
                    "ms_per_step": ms_per_step,
                    "patches_per_s": batch * accelerator.num_processes * 1000 / ms_per_step,
                }
                history.append(entry)
                if main:
                    log.info(
                        "step %06d/%06d | loss %.4f | lr %.1e | gnorm %.2f | %.0f ms/step | %.0f img/s | "
                        "mem %.1f GiB",
                        step,
                        cfg.optim.max_steps,
                        entry["loss"],
                        lr,
                        gnorm,
                        ms_per_step,
                        entry["patches_per_s"],
                        _memory_gib(accelerator.device),
                    )
                if on_log is not None:
                    on_log(entry)
                interval_losses = []
                interval_start = time.perf_counter()
    bar.close()

    accelerator.wait_for_everyone()
    trained = accelerator.unwrap_model(network) if ema is None else ema.module
    trained.eval()
    segmenter = Segmenter(trained, cfg, cfg.infer.threshold, dict(choices), mixed_precision=mixed)
    threshold_source = "config"
    train_dice = None
    if cfg.infer.tune_threshold and real_cases:
        probs = [segmenter.predict_output(image) for image, _mask, _fov in real_cases]
        segmenter.threshold, train_dice = choose_threshold(
            probs, [mask for _i, mask, _f in real_cases], [fov for _i, _m, fov in real_cases]
        )
        threshold_source = "training shots (max Dice)"
    segmenter.record = {
        "steps": step,
        "num_real_cases": len(real_pool),
        "num_synthetic_pairs_seen": synthetic_pool.num_added,
        "batch_real_synthetic": [batch - synthetic_in_batch(0), synthetic_in_batch(0)],  # at the first step
        "synthetic_patches": synthetic_patches,  # per process, over the whole training (count)
        "num_processes": accelerator.num_processes,
        "num_parameters": num_params,
        "peak_lr": cfg.optim.lr,
        "final_loss": history[-1]["loss"],  # of the trained weights, not of their average
        "weights": "last step" if ema is None else f"average (ema_decay {cfg.optim.ema_decay})",
        "pseudo_labels": pseudo_record,  # None unless self-training ran
        "pseudo_patches": pseudo_patches,  # per process, cut from pseudo-labelled images (count)
        "threshold_source": threshold_source,
        "train_dice_at_threshold": train_dice,
        "field_from_image": field_choice,
        "input_polarity": polarity_choice,
        "wall_s": round(time.perf_counter() - started, 1),
        "history": history,
    }
    if main:
        log.info(
            "segmenter %s trained: %d steps in %.0f s | final loss %.4f | threshold %.2f (%s)",
            cfg.net.arch,
            step,
            segmenter.record["wall_s"],
            history[-1]["loss"],
            segmenter.threshold,
            threshold_source,
        )
        log.info("field of view from the image: %s", field_choice["why"])
        log.info("polarity: %s", polarity_choice["why"])
        if model_dir is not None:
            segmenter.save(model_dir)
    accelerator.wait_for_everyone()
    return segmenter

"""Settings of the segmenter and of a few-shot fine-tuning run, as frozen dataclasses.

    cfg = load_finetune_config("configs/finetune/cpu-fast.yaml", ["segmenter.optim.max_steps=200"])
    seg_cfg = cfg.segmenter

`SegmenterConfig` is everything `finetune.segmenter.train_segmenter` needs; it is saved beside every
trained model (`<run>/model/config.json`), so a model folder alone says how to rebuild and run its network.
`FinetuneConfig` is the whole run's config (`configs/finetune/*.yaml`); the synthesis settings join it
as further parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_engine.corpus import MorphologyConfig
from univg.config import ConfigError, load_config

# Network families (see finetune.segmenter.build_network):
#   unet            MONAI UNet, residual units, instance norm (the nnU-Net-like baseline)
#   attention_unet  MONAI AttentionUnet (attention gates on the skip connections)
#   swin_unetr      MONAI SwinUNETR, 2D (shifted-window transformer encoder, conv decoder)
#   resnet_unet     MONAI FlexibleUNet with a randomly initialised ResNet encoder (DeepLab-like residual
#                   encoder; no pretrained weights, so it works offline)
#   segresnet       MONAI SegResNet (residual encoder-decoder, group norm)
Architecture = Literal["unet", "attention_unet", "swin_unetr", "resnet_unet", "segresnet"]
ARCHITECTURES: tuple[str, ...] = ("unet", "attention_unet", "swin_unetr", "resnet_unet", "segresnet")


@dataclass(frozen=True)
class InputConfig:
    """How an image becomes network input (finetune.sampler.prepare_image)."""

    # Every image becomes 3 channels, RGB order: colour images as they are, grey ones replicated into all
    # three, so grey and colour tasks (and grey synthetic images for a colour task) share one network.
    # Each channel is then z-scored over the whole image after clipping to its own 0.5..99.5 percentiles.
    max_side_px: int = 0  # images with a longer side (px) are downscaled to it for the network; 0 = never
    # the task's images as they are, or inverted (their input negated), to match the polarity a pretrained
    # start reads best: "auto" decides on the shots (finetune/polarity.py), "as_is" / "inverted" force it
    polarity: Literal["auto", "as_is", "inverted"] = "auto"

    def __post_init__(self) -> None:
        if self.max_side_px < 0:
            raise ValueError(f"input.max_side_px={self.max_side_px} must be >= 0 (0 keeps native size)")
        if self.polarity not in ("auto", "as_is", "inverted"):
            raise ValueError(f"input.polarity={self.polarity!r} must be 'auto', 'as_is' or 'inverted'")


@dataclass(frozen=True)
class NetConfig:
    """Which network, and how big."""

    arch: Architecture = "unet"  # network family (list above)
    base_channels: int = 16  # feature maps at full resolution (count), doubled per level; swin: 12k
    num_levels: int = 4  # resolution levels incl. full resolution (count); unet / attention_unet / segresnet
    backbone: str = "resnet18"  # resnet_unet encoder: resnet10, resnet18 or resnet34 (random init)
    dropout: float = 0.0  # dropout probability in the network (fraction)

    def __post_init__(self) -> None:
        if self.base_channels < 4:
            raise ValueError(f"net.base_channels={self.base_channels} must be >= 4")
        if self.arch == "swin_unetr" and self.base_channels % 12:
            raise ValueError(
                f"net.base_channels={self.base_channels} must be a multiple of 12 for swin_unetr "
                "(its feature size is split over 3, 6, 12 and 24 attention heads)"
            )
        if self.arch == "segresnet" and self.base_channels % 8:
            raise ValueError(
                f"net.base_channels={self.base_channels} must be a multiple of 8 for segresnet "
                "(group norm with 8 groups)"
            )
        if not 2 <= self.num_levels <= 6:
            raise ValueError(f"net.num_levels={self.num_levels} must be in 2..6")
        if self.backbone not in ("resnet10", "resnet18", "resnet34"):
            raise ValueError(f"net.backbone={self.backbone!r} must be resnet10, resnet18 or resnet34")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"net.dropout={self.dropout} must be in [0, 1)")

    @property
    def size_multiple_px(self) -> int:
        """Patch and window sides must be multiples of this (px): the network halves them this often."""
        if self.arch == "swin_unetr":
            return 32  # patch embedding /2, then four /2 merges
        if self.arch == "resnet_unet":
            return 32  # ResNet stem /4, then three /2 stages
        return 2 ** (self.num_levels - 1)


@dataclass(frozen=True)
class PatchConfig:
    """Training patches: size, batch and where they come from."""

    patch_size_px: int = 96  # side of the square training patches (px); multiple of net.size_multiple_px
    batch_size: int = 8  # patches per optimizer step on each process (count)
    foreground_fraction: float = 0.33  # share of patches centred on a random vessel pixel (nnU-Net: 0.33)
    synthetic_fraction: float = 0.5  # share of each batch drawn from synthetic pairs, when any are given
    # synthetic share at the last step (ratio); None keeps synthetic_fraction throughout. Between the two
    # it moves linearly with the step, so a decay to 0 ends training on the real shots alone
    synthetic_fraction_end: float | None = None
    synthetic_pool_size: int = 256  # synthetic pairs held in memory at once (count); oldest replaced first
    synthetic_refresh_per_step: int = 1  # new synthetic pairs pulled from the source per step (count)

    def __post_init__(self) -> None:
        if self.patch_size_px < 16:
            raise ValueError(f"patch.patch_size_px={self.patch_size_px} must be >= 16")
        if self.batch_size < 1:
            raise ValueError(f"patch.batch_size={self.batch_size} must be >= 1")
        for name in ("foreground_fraction", "synthetic_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"patch.{name}={value} must be in [0, 1]")
        end = self.synthetic_fraction_end
        if end is not None and not 0.0 <= end <= 1.0:
            raise ValueError(f"patch.synthetic_fraction_end={end} must be in [0, 1] (or null for constant)")
        if self.synthetic_pool_size < 1:
            raise ValueError(f"patch.synthetic_pool_size={self.synthetic_pool_size} must be >= 1")
        if self.synthetic_refresh_per_step < 0:
            raise ValueError(
                f"patch.synthetic_refresh_per_step={self.synthetic_refresh_per_step} must be >= 0"
            )

    def synthetic_share(self, step: int, max_steps: int) -> float:
        """Share of the batch that is synthetic at `step` (0-based) of `max_steps`."""
        if self.synthetic_fraction_end is None or max_steps <= 1:
            return self.synthetic_fraction
        t = min(max(step / (max_steps - 1), 0.0), 1.0)
        return self.synthetic_fraction + (self.synthetic_fraction_end - self.synthetic_fraction) * t


@dataclass(frozen=True)
class AugmentConfig:
    """Random changes to each training patch; every `*_prob` is a per-patch probability in [0, 1]."""

    flip_prob: float = 0.5  # mirror left-right, and (independently) top-bottom
    rot90_prob: float = 0.5  # rotate by a random multiple of 90 degrees
    rotate_prob: float = 0.3  # rotate by a small random angle as well
    max_rotate_deg: float = 20.0  # largest small rotation (degrees, either way)
    scale_prob: float = 0.3  # zoom in or out
    scale_range: tuple[float, float] = (0.8, 1.25)  # zoom factor range (ratio; > 1 magnifies)
    gamma_prob: float = 0.3  # gamma curve on the patch's own min..max range
    gamma_range: tuple[float, float] = (0.7, 1.5)  # gamma exponent range
    contrast_prob: float = 0.3  # scale intensities about the patch mean
    contrast_range: tuple[float, float] = (0.75, 1.25)  # contrast factor range (ratio)
    brightness_prob: float = 0.3  # shift intensities
    brightness_std: float = 0.2  # brightness shift standard deviation (image std units)
    noise_prob: float = 0.15  # additive Gaussian noise
    noise_std_range: tuple[float, float] = (0.0, 0.1)  # noise standard deviation range (image std units)
    blur_prob: float = 0.15  # Gaussian blur
    blur_sigma_range: tuple[float, float] = (0.5, 1.0)  # blur sigma range (px)
    # Field cut: the patch beyond a random straight or round edge becomes flat and darker than anything in
    # it, with no vessel there: what the outside of a collimator or field of view looks like. Teaches that
    # a large dark region is not a vessel even when the shots show none. 0 turns it off (and leaves the
    # random stream of the other augmentations as it was).
    field_cut_prob: float = 0.0
    field_cut_depth: tuple[float, float] = (0.0, 1.5)  # how far below the patch minimum (image std units)

    def __post_init__(self) -> None:
        for name in (
            "field_cut_prob",
            "flip_prob",
            "rot90_prob",
            "rotate_prob",
            "scale_prob",
            "gamma_prob",
            "contrast_prob",
            "brightness_prob",
            "noise_prob",
            "blur_prob",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.{name}={value} must be a probability in [0, 1]")
        ranges = ("scale_range", "gamma_range", "contrast_range", "noise_std_range", "blur_sigma_range")
        for name in (*ranges, "field_cut_depth"):
            low, high = getattr(self, name)
            may_be_zero = name in ("noise_std_range", "field_cut_depth")
            if not 0.0 <= low <= high or (not may_be_zero and low <= 0.0):
                bound = "0 <= low" if may_be_zero else "0 < low"
                raise ValueError(f"augment.{name}=({low}, {high}) must be a range {bound} <= high")
        if self.max_rotate_deg < 0 or self.brightness_std < 0:
            raise ValueError("augment.max_rotate_deg and augment.brightness_std must be >= 0")


@dataclass(frozen=True)
class LossConfig:
    """Loss = dice_weight * soft Dice + bce_weight * BCE + cldice_weight * soft clDice (on sigmoid output)."""

    dice_weight: float = 1.0  # soft Dice loss weight (batch-wise Dice, so patches without vessel still count)
    bce_weight: float = 1.0  # binary cross-entropy weight
    cldice_weight: float = 0.0  # soft clDice weight (MONAI SoftclDiceLoss); 0 turns it off
    cldice_iters: int = 3  # soft-skeleton iterations of clDice (count; about the largest vessel radius, px)

    def __post_init__(self) -> None:
        weights = (self.dice_weight, self.bce_weight, self.cldice_weight)
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"loss weights {weights} must be >= 0 and not all 0")
        if self.cldice_iters < 1:
            raise ValueError(f"loss.cldice_iters={self.cldice_iters} must be >= 1")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to zero."""

    max_steps: int = 1000  # optimizer steps of one training (count)
    lr: float = 1e-3  # peak learning rate
    # peak learning rate instead of lr when training starts from pretrained weights (pretrained_segmenter);
    # a start that already segments vessels takes a larger step toward the task than random weights do (0: lr)
    pretrained_lr: float = 0.0
    warmup_steps: int = 50  # linear warm-up from 0 to lr (optimizer steps)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    # pull toward the pretrained start after each step, w -= lr * anchor_decay * (w - w_start): L2-SP
    # (Li et al. 2018) decoupled as AdamW decouples weight decay; only with a pretrained start (0: off)
    anchor_decay: float = 0.0
    # exponential moving average of the weights, w_ema <- d * w_ema + (1 - d) * w after each step from
    # ema_start_step on; the averaged weights are the ones kept (0: off, keep the last step's)
    ema_decay: float = 0.0
    ema_start_step: int = 0  # optimizer steps before the average starts (from a copy of the weights then)

    def __post_init__(self) -> None:
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"optim.ema_decay={self.ema_decay} must be in [0, 1)")
        if not 0 <= self.ema_start_step < self.max_steps:
            raise ValueError(f"optim.ema_start_step={self.ema_start_step} must be in 0..optim.max_steps-1")
        if self.max_steps < 1:
            raise ValueError(f"optim.max_steps={self.max_steps} must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if self.pretrained_lr < 0:
            raise ValueError(f"optim.pretrained_lr={self.pretrained_lr} must be >= 0 (0: optim.lr)")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be in 0..optim.max_steps")
        if self.anchor_decay < 0:
            raise ValueError(f"optim.anchor_decay={self.anchor_decay} must be >= 0")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("optim.weight_decay and optim.grad_clip must be >= 0")


@dataclass(frozen=True)
class InferConfig:
    """Full-size prediction by sliding window, and the threshold that turns probabilities into a mask."""

    window_size_px: int = 0  # sliding-window side (px); 0 = patch.patch_size_px (what the network saw)
    overlap: float = 0.5  # overlap of neighbouring windows (fraction of the window)
    window_batch_size: int = 8  # windows per forward pass (count)
    blend: Literal["gaussian", "constant"] = "gaussian"  # how overlapping windows are averaged
    threshold: float = 0.5  # probability above which a pixel is vessel, unless tuned
    tune_threshold: bool = True  # choose the threshold by `threshold_rule` (never on test labels)
    # "shots": the maximum Dice on the training shots. "area": the threshold at which the vessel fraction
    # predicted over the task's unlabelled images (its labelled pool minus the shots, labels unread) equals
    # the shots' labelled fraction; "shots" where there is no unlabelled image (full supervision)
    threshold_rule: Literal["shots", "area"] = "shots"
    area_images: int = 16  # most unlabelled images the "area" rule predicts, spread over the pool (count)
    # test-time mirroring (nnU-Net's): average the probabilities of the image and its horizontal, vertical
    # and double flips; 4x the inference time
    flip_tta: bool = False
    # and the same views of the image turned by 90 degrees (with flip_tta: all 8 symmetries of the square,
    # which patch training's mirror and rot90 augmentation teaches); twice the inference time again
    rot90_tta: bool = False
    # masks cleared outside the field of view estimated from each image (finetune/field.py: the dark, flat
    # outside of a collimator or round camera field, or a white one, joined to the border). "auto": when the
    # estimate keeps the labelled vessels of every training shot (decided on the shots, recorded in the
    # model); "always", "never". A task's own FOV masks are scored as before either way
    field_from_image: Literal["auto", "always", "never"] = "auto"

    def __post_init__(self) -> None:
        if self.window_size_px < 0:
            raise ValueError(f"infer.window_size_px={self.window_size_px} must be >= 0")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"infer.overlap={self.overlap} must be in [0, 1)")
        if self.window_batch_size < 1:
            raise ValueError(f"infer.window_batch_size={self.window_batch_size} must be >= 1")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"infer.threshold={self.threshold} must be in (0, 1)")
        if self.threshold_rule not in ("shots", "area"):
            raise ValueError(f"infer.threshold_rule={self.threshold_rule!r} must be 'shots' or 'area'")
        if self.area_images < 1:
            raise ValueError(f"infer.area_images={self.area_images} must be >= 1")
        if self.field_from_image not in ("auto", "always", "never"):
            raise ValueError(
                f"infer.field_from_image={self.field_from_image!r} must be 'auto', 'always' or 'never'"
            )


@dataclass(frozen=True)
class PseudoLabelConfig:
    """Self-training on the task's unlabelled images (its labelled pool minus the shots; labels never read).

    After `start_fraction` of the steps, the segmenter being trained predicts those images; its masks, cut
    by `threshold_rule` (the threshold best on the shots at that moment, or where the masks hold the shots'
    share of vessel), become pseudo-labels, and from then on a share of each batch is cut from them. The step
    count is unchanged. Off by default (the cpu-fast and gpu profiles turn it on); it applies to the methods
    in `methods`: univg and univg_gen unless told otherwise, so the baseline stays the shots with standard
    augmentation alone.
    """

    enabled: bool = False  # label the unlabelled images midway and train on them too
    start_fraction: float = 0.5  # share of optim.max_steps trained before the images are labelled (ratio)
    batch_fraction: float = 0.25  # share of each later batch cut from them, out of the real shots' share
    max_images: int = 16  # most unlabelled images labelled, spread over the pool (count)
    methods: tuple[str, ...] = ("univg", "univg_gen")  # the methods that self-train (full has no pool)
    flip_tta: bool = False  # label with mirrored averaging (as infer.flip_tta scores), not one plain pass
    # where the pseudo-labels are cut: "shots" at the threshold best on the shots at that moment, "area" where
    # the vessel fraction over the unlabelled images equals the shots' labelled fraction (class-balanced)
    threshold_rule: Literal["shots", "area"] = "shots"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - {"univg", "univg_gen", "baseline"})
        if unknown:
            raise ValueError(
                f"pseudo.methods: {unknown[0]!r} cannot self-train; choose from univg, univg_gen, baseline"
            )
        if not 0.0 < self.start_fraction < 1.0:
            raise ValueError(f"pseudo.start_fraction={self.start_fraction} must be in (0, 1)")
        if not 0.0 < self.batch_fraction < 1.0:
            raise ValueError(f"pseudo.batch_fraction={self.batch_fraction} must be in (0, 1)")
        if self.max_images < 1:
            raise ValueError(f"pseudo.max_images={self.max_images} must be >= 1")
        if self.threshold_rule not in ("shots", "area"):
            raise ValueError(f"pseudo.threshold_rule={self.threshold_rule!r} must be 'shots' or 'area'")


@dataclass(frozen=True)
class SegmenterConfig:
    """One segmenter training: network, patches, augmentation, loss, optimizer, inference."""

    input: InputConfig = field(default_factory=InputConfig)  # image -> network input
    net: NetConfig = field(default_factory=NetConfig)  # network family and size
    patch: PatchConfig = field(default_factory=PatchConfig)  # training patches and batch mix
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # patch augmentation
    loss: LossConfig = field(default_factory=LossConfig)  # loss terms and weights
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and schedule
    infer: InferConfig = field(default_factory=InferConfig)  # sliding window and threshold
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)  # self-training, off by default
    seed: int = 0  # seeds network init (same on every process) and patch sampling (seed + process index)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: bf16 on a GPU with it, else no
    log_every_steps: int = 50  # one log line every this many optimizer steps

    def __post_init__(self) -> None:
        multiple = self.net.size_multiple_px
        if self.patch.patch_size_px % multiple:
            raise ValueError(
                f"patch.patch_size_px={self.patch.patch_size_px} must be a multiple of {multiple} for "
                f"net.arch={self.net.arch} (num_levels={self.net.num_levels})"
            )
        if self.net.arch == "swin_unetr" and self.patch.patch_size_px < 64:
            raise ValueError(
                f"patch.patch_size_px={self.patch.patch_size_px} must be >= 64 for swin_unetr (its deepest "
                "stage, at 1/32 of the patch, needs more than one pixel for instance norm)"
            )
        if self.infer.window_size_px % multiple:
            raise ValueError(
                f"infer.window_size_px={self.infer.window_size_px} must be a multiple of {multiple} for "
                f"net.arch={self.net.arch}"
            )
        if self.log_every_steps < 1:
            raise ValueError(f"log_every_steps={self.log_every_steps} must be >= 1")

    @property
    def window_size_px(self) -> int:
        """Sliding-window side actually used (px)."""
        return self.infer.window_size_px or self.patch.patch_size_px


@dataclass(frozen=True)
class RouteMix:
    """Share of synthetic pairs made each way; normalised to sum to 1."""

    composite: float = 0.75  # new mask drawn into a shot's vessel-free background
    augment: float = 0.25  # a real shot, geometrically augmented (image and mask warped together)


@dataclass(frozen=True)
class MaskSourceMix:
    """Share of composite masks from each source (module docstring); normalised to sum to 1."""

    shot: float = 0.45  # a shot's own graph, re-posed and re-styled
    recombined: float = 0.4  # sub-trees of all shots grafted together
    regrowth: float = 0.15  # space colonization inside a shot's vessel region (coarser-looking trees)


def _task_morphology() -> MorphologyConfig:
    # Milder than the corpus ranges: the point is new masks with this task's look, not every look.
    return MorphologyConfig(
        radius_scale=(0.85, 1.2),
        tortuosity=(0.0, 0.3),
        branch_density=(0.7, 1.3),
        pruning_depth=(0, 1),
        vessel_count=(1, 3),
        rotation_deg=(-30.0, 30.0),
        scale=(0.85, 1.15),
        elastic_px=(0.0, 6.0),
    )


@dataclass(frozen=True)
class AugmentRoute:
    """Geometric augmentation of a real pair (the `augment` route)."""

    max_rotate_deg: float = 20.0  # largest rotation about the image centre (degrees, either way)
    scale_range: tuple[float, float] = (0.9, 1.1)  # zoom factor range (ratio)
    elastic_px: float = 3.0  # RMS displacement of the smooth elastic warp at 512 px (px; scales with size)


@dataclass(frozen=True)
class SynthesisConfig:
    """How many synthetic pairs a few-shot run makes from its shots, and how."""

    num_pairs: int = 200  # synthetic pairs written per draw (count)
    seed: int = 0  # pair i uses np.random.default_rng([seed, i])
    routes: RouteMix = field(default_factory=RouteMix)  # composite vs augment
    sources: MaskSourceMix = field(default_factory=MaskSourceMix)  # where composite masks come from
    morphology: MorphologyConfig = field(default_factory=_task_morphology)  # ranges each mask draws from
    augment: AugmentRoute = field(default_factory=AugmentRoute)  # the plain route's warp
    samples_per_shard: int = 64  # pairs per shard file (count)
    png_compression: int = 1  # zlib level 0-9 of the shard PNGs

    def __post_init__(self) -> None:
        if self.num_pairs < 0:
            raise ValueError(f"synthesis.num_pairs={self.num_pairs} must be >= 0")
        for name, mix in (("routes", self.routes), ("sources", self.sources)):
            shares = list(vars(mix).values())
            if min(shares) < 0 or sum(shares) <= 0:
                raise ValueError(f"synthesis.{name}={mix} needs non-negative shares with a positive sum")
        if self.samples_per_shard < 1 or not 0 <= self.png_compression <= 9:
            raise ValueError("synthesis.samples_per_shard must be >= 1 and png_compression in 0..9")


NEW_MODALITY = "new"  # adapt.modality for a modality the generator never saw: its spare slot

# The UNet2DModel layers that carry a modality's appearance: attention projections and each ResNet's two
# convolutions and its timestep(+class)-embedding projection. peft matches these as name suffixes.
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "conv1",
    "conv2",
    "time_emb_proj",
)


@dataclass(frozen=True)
class AdaptConfig:
    """How the pretrained generator is adapted to a few real image-mask pairs."""

    method: Literal["lora", "full"] = "lora"  # LoRA adapters on a frozen UNet, or every weight trained
    lora_rank: int = 8  # rank of each LoRA update (count)
    lora_alpha: int = 8  # LoRA scale numerator: the update is scaled by alpha / rank (ratio)
    lora_dropout: float = 0.0  # dropout on the LoRA branch input (probability)
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES  # module name suffixes that get LoRA (names)
    train_class_embedding: bool = True  # "lora": also train the modality embedding (a "new" one needs it)
    init_new_from_mean: bool = True  # "new": the spare row starts as the mean of the trained rows (flag)
    modality: str = NEW_MODALITY  # a built-in modality name, or "new" for the generator's spare slot
    max_steps: int = 300  # optimizer steps (count)
    lr: float = 1e-4  # peak learning rate (per step); ~1e-4 for LoRA, ~1e-5 for "full"
    warmup_steps: int = 20  # optimizer steps of linear warmup from 0 to lr, then constant
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 turns clipping off
    batch_size: int = 4  # augmented crops per optimizer step (count)
    seed: int = 0  # LoRA init, crops and noise (a run is a pure function of config, shots and base)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 (or fp16) on CUDA, no on CPU
    # real crop side before resizing to the generator's (px): the image_size_px of the corpus the generator
    # was pretrained on (512 for univg58k), whose whole images it saw shrunk to its own side
    crop_side_px: int = 512
    crop_scale_range: tuple[float, float] = (0.8, 1.25)  # random factor on crop_side_px (ratio, low..high)
    min_vessel_fraction: float = 0.01  # a crop with less vessel area is redrawn (fraction of its pixels)
    flip: bool = True  # random horizontal and vertical flips (flag)
    rot90: bool = True  # random turns by 0/90/180/270 degrees (flag)
    log_every_steps: int = 25  # optimizer steps between log lines (count)
    # also save the adapter after these steps (count), into snapshots/step_<step:06d>/: candidates for the
    # segmentation feedback's choice of adaptation length
    snapshot_steps: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ValueError(f"adapt.method={self.method!r} must be 'lora' or 'full'")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ValueError(
                f"adapt.lora_rank={self.lora_rank} must be >= 1 and adapt.lora_alpha={self.lora_alpha} > 0"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"adapt.lora_dropout={self.lora_dropout} must be in [0, 1)")
        if self.method == "lora" and not self.target_modules:
            raise ValueError("adapt.target_modules is empty: LoRA needs modules to adapt, e.g. to_q, conv1")
        if not self.modality:
            raise ValueError("adapt.modality is empty: give a built-in modality name or 'new'")
        for name in ("max_steps", "batch_size", "log_every_steps", "crop_side_px"):
            if getattr(self, name) < 1:
                raise ValueError(f"adapt.{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError(
                f"adapt: lr must be > 0, warmup_steps >= 0, grad_clip >= 0 (got lr={self.lr}, "
                f"warmup_steps={self.warmup_steps}, grad_clip={self.grad_clip})"
            )
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"adapt.mixed_precision={self.mixed_precision!r} must be auto, no, bf16 or fp16")
        low, high = self.crop_scale_range
        if not 0 < low <= high:
            raise ValueError(
                f"adapt.crop_scale_range={self.crop_scale_range} must be (low, high), 0 < low <= high"
            )
        if not 0.0 <= self.min_vessel_fraction < 1.0:
            raise ValueError(f"adapt.min_vessel_fraction={self.min_vessel_fraction} must be in [0, 1)")
        bad = [k for k in self.snapshot_steps if not 1 <= k <= self.max_steps]
        if bad:
            raise ValueError(f"adapt.snapshot_steps {bad} must lie in 1..adapt.max_steps={self.max_steps}")


@dataclass(frozen=True)
class FeedbackConfig:
    """Segmentation feedback into generation: candidates (adaptation length x guidance x real/synthetic
    mix) scored by leave-one-out Dice on the shots; the best one makes the run's synthetic set."""

    enabled: bool = True  # score the candidates; off (or fewer than 2 shots): the first of each list
    guidance_scales: tuple[float, ...] = (1.0, 2.0)  # mask guidance scales tried (ratio; 1 = none)
    synthetic_fractions: tuple[float, ...] = (0.25, 0.5)  # share of synthetic patches per batch, tried
    num_folds: int = 3  # held-out shots scored, each by a segmenter trained on the other shots (count)
    segmenter_steps: int = 200  # optimizer steps of each fold's segmenter (count)
    num_pairs: int = 24  # synthetic pairs per fold and candidate (count)
    # the shots alone ("none": no synthetic patches) competes too, so generated pairs that hurt the
    # held-out shots are not used at all
    allow_real_only: bool = True

    def __post_init__(self) -> None:
        if not self.guidance_scales or not self.synthetic_fractions:
            raise ValueError("feedback.guidance_scales and feedback.synthetic_fractions need a value each")
        if any(g <= 0 for g in self.guidance_scales):
            raise ValueError(f"feedback.guidance_scales {list(self.guidance_scales)} must be > 0")
        if any(not 0.0 < f <= 1.0 for f in self.synthetic_fractions):
            raise ValueError(
                f"feedback.synthetic_fractions {list(self.synthetic_fractions)} must be in (0, 1]"
            )
        if self.num_folds < 1 or self.segmenter_steps < 1 or self.num_pairs < 1:
            raise ValueError("feedback.num_folds, segmenter_steps and num_pairs must be >= 1")


@dataclass(frozen=True)
class GeneratorRouteConfig:
    """The `univg_gen` method: the pretrained generator adapted to the shots draws the synthetic images."""

    adapt: AdaptConfig = field(default_factory=AdaptConfig)  # LoRA / full adaptation on the shots
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)  # choice by leave-one-out Dice
    num_pairs: int = 200  # synthetic pairs the chosen candidate makes per draw (count)
    batch_size: int = 8  # masks per generator call (count)
    num_inference_steps: int = 0  # sampler steps (count); 0 = what the generator was trained with

    def __post_init__(self) -> None:
        if self.num_pairs < 1 or self.batch_size < 1 or self.num_inference_steps < 0:
            raise ValueError("generator.num_pairs and batch_size must be >= 1, num_inference_steps >= 0")


Method = Literal["univg", "univg_gen", "baseline", "full"]
METHODS: tuple[str, ...] = ("univg", "univg_gen", "baseline", "full")


@dataclass(frozen=True)
class SplitConfig:
    """Which real labelled cases a few-shot run trains on (finetune.split)."""

    shots: int = 5  # labelled real cases drawn from the task's train split (count)
    seed: int = 0  # seed of the first draw; draw d uses seed + d, each written to <run>/draw_<d>/split.json
    num_draws: int = 3  # independent draws of the shots; results are reported as mean and std over them

    def __post_init__(self) -> None:
        if self.shots < 1:
            raise ValueError(f"split.shots={self.shots} must be >= 1")
        if self.num_draws < 1:
            raise ValueError(f"split.num_draws={self.num_draws} must be >= 1")


@dataclass(frozen=True)
class RehearsalConfig:
    """Rehearsal: pairs of the engine corpus a pretrained segmenter learned from, mixed back into the
    synthetic stream of univg and univg_gen while they fine-tune, against forgetting what the corpus taught
    (such as: flat dark regions outside a field of view hold no vessels). Off while `corpus` is empty."""

    corpus: str = ""  # a shard corpus folder (`univg shards build`): the one the segmenter was pretrained on
    share: float = 0.25  # fraction of the synthetic stream's pairs that are corpus pairs (ratio, in (0, 1))
    modalities: tuple[str, ...] = ()  # corpus modalities to draw from; () = every one it holds
    seed: int = 0  # shuffles the corpus shard order
    # thin the rehearsed corpus masks: keep the pixels farther than thin_px from the background, and every
    # centreline pixel, so no vessel vanishes (px; 0: off). For a task whose labels are drawn thinner than
    # the corpus's masks, which rehearsal would otherwise keep teaching
    thin_px: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.share < 1.0:
            raise ValueError(f"rehearsal.share={self.share} must be in (0, 1)")
        if self.thin_px < 0:
            raise ValueError(f"rehearsal.thin_px={self.thin_px} must be >= 0")


@dataclass(frozen=True)
class FinetuneConfig:
    """A few-shot fine-tuning run (`configs/finetune/*.yaml`)."""

    split: SplitConfig = field(default_factory=SplitConfig)  # the few-shot draws
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)  # every segmenter the run trains
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)  # engine synthesis from the shots
    generator: GeneratorRouteConfig = field(default_factory=GeneratorRouteConfig)  # univg_gen only
    # What the run trains and scores, each with the same segmenter and budget: univg (shots + engine
    # synthesis), univg_gen (shots + images from the generator adapted to them; needs --generator),
    # baseline (the same shots, standard augmentation only), full (every label of the pool, once)
    methods: tuple[Method, ...] = ("univg", "baseline", "full")
    # A segmenter folder (`univg segmenter-pretrain` on the engine corpus) whose weights univg and univg_gen
    # start from; "" = from scratch. The baseline and full supervision always start from scratch (they are
    # the references), so the gain it brings shows in the univg columns.
    pretrained_segmenter: str = ""
    rehearsal: RehearsalConfig = field(default_factory=RehearsalConfig)  # corpus pairs mixed in (default off)
    overlays: bool = True  # write overlay pictures of every scored case
    max_eval_cases: int = 0  # score only the first N eval cases (count; 0 = all): quick looks, not results

    def __post_init__(self) -> None:
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods={list(self.methods)} must name each of {list(METHODS)} at most once")
        if self.max_eval_cases < 0:
            raise ValueError(f"max_eval_cases={self.max_eval_cases} must be >= 0 (0 scores every case)")


def load_finetune_config(path: str | Path, overrides: list[str] | None = None) -> FinetuneConfig:
    """Load a fine-tuning YAML plus dotted overrides; any bad value raises a ConfigError naming the file."""
    try:
        return load_config(FinetuneConfig, path, overrides)
    except ConfigError:
        raise
    except ValueError as e:  # a field check in a __post_init__
        raise ConfigError(f"{path}: {e}") from e

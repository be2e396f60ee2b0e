"""Network input and training patches: image -> normalised 3-channel array, and patch batches drawn from
a pool of cases with foreground oversampling and augmentation.

    image_3HW = prepare_image(read_image(path))               # float32, RGB, per-channel z-score
    pool = PatchPool(max_cases=64)
    pool.add(image_3HW, mask_HW)                               # mask uint8 {0, 255} (or {0, 1} / bool)
    image_N3PP, mask_N1PP = pool.sample(rng, 8, patch_size_px=96, foreground_fraction=0.33, augment=cfg)

Legend: N patches in a batch, P patch side (px), H x W image size (px), 3 = RGB channels.

Patch placement follows nnU-Net: a `foreground_fraction` share of patches is centred on a vessel pixel
picked uniformly from a uniformly picked case (so a single thin artery in a large image is not starved),
the rest are placed uniformly. A patch is cut with one affine warp that also applies the geometric
augmentation (mirror, rot90, small rotation, zoom) about the patch centre; without augmentation the warp
is an exact pixel copy. A zoom out cuts a larger region and area-averages it down, so thin vessels fade as
they do at a lower resolution instead of being skipped between sampled pixels. Pixels beyond the image are
0, which after normalisation is the image mean, the same value sliding-window inference pads with. An
optional field cut (a dark, vessel-free region beyond a random edge) and intensity augmentation (gamma,
contrast, brightness, noise, blur) then act on the normalised patch.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from finetune.config import AugmentConfig

# Per-channel percentiles an image is clipped to before z-scoring (nnU-Net clips CT to 0.5..99.5 too):
# a few saturated or dead pixels then cannot set the scale.
_CLIP_PERCENTILES = (0.5, 99.5)


def input_size(height_px: int, width_px: int, max_side_px: int) -> tuple[int, int]:
    """(height, width) an image of this size is given to the network at (downscaled if its longer side
    exceeds max_side_px; max_side_px 0 keeps it)."""
    longer = max(height_px, width_px)
    if max_side_px <= 0 or longer <= max_side_px:
        return height_px, width_px
    scale = max_side_px / longer
    return max(1, round(height_px * scale)), max(1, round(width_px * scale))


def check_scale(factor: float, name: str) -> None:
    """Refuse a resize factor (the option `name`) that is not a positive finite number."""
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"{name} {factor} must be a positive number (1: the images as they are)")


def resize_by(image: np.ndarray, factor: float) -> np.ndarray:
    """The image resized by `factor` on both sides (area interpolation down, cubic up); 1 returns it as is."""
    if factor == 1.0:
        return image
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1.0 else cv2.INTER_CUBIC)


def prepare_image(image: np.ndarray, max_side_px: int = 0) -> np.ndarray:
    """uint8 HxW grey or HxWx3 BGR (as `data_engine.io.read_image` gives) -> float32 3xH'xW' network input.

    RGB order, grey replicated into the three channels; each channel clipped to its own 0.5..99.5
    percentiles, then z-scored over the whole image (a constant channel becomes 0).
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(
            f"prepare_image: expected a uint8 array (as read_image gives), got "
            f"{getattr(image, 'dtype', type(image).__name__)}"
        )
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)) or min(image.shape[:2]) < 1:
        raise ValueError(f"prepare_image: expected HxW grey or HxWx3 BGR, got shape {image.shape}")
    height, width = input_size(image.shape[0], image.shape[1], max_side_px)
    if (height, width) != image.shape[:2]:
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    planes = [image] * 3 if image.ndim == 2 else [image[:, :, 2], image[:, :, 1], image[:, :, 0]]
    out_3HW = np.empty((3, height, width), np.float32)
    for c, plane in enumerate(planes):
        values = plane.astype(np.float32)
        low, high = np.percentile(values, _CLIP_PERCENTILES)
        np.clip(values, low, high, out=values)
        std = float(values.std())
        out_3HW[c] = (values - float(values.mean())) / std if std > 1e-6 else 0.0
    return out_3HW


def prepare_mask(mask: np.ndarray, height_px: int, width_px: int) -> np.ndarray:
    """Mask (uint8 {0, 255} / {0, 1} or bool, HxW) -> uint8 {0, 1} at height x width (area-resized and
    thresholded at half when the size differs, so thin vessels are kept where they cover half a pixel)."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise ValueError(f"prepare_mask: expected an HxW mask array, got {getattr(mask, 'shape', mask)}")
    binary = (mask > 0).astype(np.float32)
    if binary.shape != (height_px, width_px):
        resized: np.ndarray = cv2.resize(binary, (width_px, height_px), interpolation=cv2.INTER_AREA)
        return (resized >= 0.5).astype(np.uint8)
    return (binary >= 0.5).astype(np.uint8)


def _affine(
    rng: np.random.Generator, centre_yx: tuple[int, int], patch_size_px: int, augment: AugmentConfig | None
) -> tuple[np.ndarray, int]:
    """The warp that cuts one patch: (2x3 matrix mapping output pixel (x, y) to image pixel (x, y), in the
    cv2.WARP_INVERSE_MAP convention; output side in px).

    A zoom out (factor < 1) shows more of the image than the patch has pixels for. Sampling it directly
    would skip pixels, and a vessel thinner than the step would flicker in and out; the image a lower
    resolution gives has it fainter and thinner instead. So the warp then cuts the region at about full
    resolution (output side ceil(P / zoom) > P) and the caller area-averages it down to P, as
    `prepare_mask` and the input cap resize images and labels.
    """
    flip_x = flip_y = 1.0
    angle = 0.0
    scale = 1.0
    if augment is not None:
        if rng.random() < augment.flip_prob:
            flip_x = -1.0
        if rng.random() < augment.flip_prob:
            flip_y = -1.0
        if rng.random() < augment.rot90_prob:
            angle += 90.0 * int(rng.integers(1, 4))
        if rng.random() < augment.rotate_prob:
            angle += float(rng.uniform(-augment.max_rotate_deg, augment.max_rotate_deg))
        if rng.random() < augment.scale_prob:
            # log-uniform, so zooming in and out by the same factor are equally likely
            low, high = augment.scale_range
            scale = math.exp(float(rng.uniform(math.log(low), math.log(high))))
    out_px = patch_size_px
    if scale < 1.0:
        out_px = math.ceil(patch_size_px / scale - 1e-9)
        scale *= out_px / patch_size_px  # the cut's own zoom, 1 or a bit above
    theta = math.radians(angle)
    cos, sin = math.cos(theta), math.sin(theta)
    # patch offset -> image offset: rotate(angle) @ (1 / zoom) @ mirror
    m = np.array([[cos, -sin], [sin, cos]]) @ np.diag([flip_x / scale, flip_y / scale])
    m = np.round(m, 12)  # exact 0 / +-1 for mirrors and rot90, so the warp stays an exact pixel copy
    centre_out = np.array([out_px // 2, out_px // 2], np.float64)
    centre_in = np.array([centre_yx[1], centre_yx[0]], np.float64)
    matrix = np.empty((2, 3), np.float64)
    matrix[:, :2] = m
    matrix[:, 2] = centre_in - m @ centre_out
    return matrix, out_px


def _augment_intensity(patch_PPC: np.ndarray, rng: np.random.Generator, augment: AugmentConfig) -> None:
    """Intensity augmentation of one normalised patch, in place."""
    if rng.random() < augment.gamma_prob:
        low, high = float(patch_PPC.min()), float(patch_PPC.max())
        if high > low:
            gamma = math.exp(
                float(rng.uniform(math.log(augment.gamma_range[0]), math.log(augment.gamma_range[1])))
            )
            unit = (patch_PPC - low) / (high - low)
            patch_PPC[...] = np.power(unit, gamma) * (high - low) + low
    if rng.random() < augment.contrast_prob:
        mean = float(patch_PPC.mean())
        factor = float(rng.uniform(*augment.contrast_range))
        patch_PPC[...] = (patch_PPC - mean) * factor + mean
    if rng.random() < augment.brightness_prob:
        patch_PPC += float(rng.normal(0.0, augment.brightness_std))
    if rng.random() < augment.noise_prob:
        std = float(rng.uniform(*augment.noise_std_range))
        patch_PPC += rng.normal(0.0, std, size=patch_PPC.shape).astype(np.float32)
    if rng.random() < augment.blur_prob:
        sigma = float(rng.uniform(*augment.blur_sigma_range))
        patch_PPC[...] = cv2.GaussianBlur(patch_PPC, (0, 0), sigmaX=sigma, sigmaY=sigma).reshape(
            patch_PPC.shape
        )


def _cut_field(
    patch_PPC: np.ndarray, mask_PP: np.ndarray, rng: np.random.Generator, augment: AugmentConfig
) -> None:
    """Field-cut augmentation of one normalised patch and its mask, in place (AugmentConfig.field_cut_*).

    An edge crosses the patch: a straight line through a random point, or an arc of a circle 0.5-3 patch
    sides wide through it. Beyond it the patch fades, over 1-3 px, to a flat level darker than the patch's
    minimum (with a little noise), and the mask is cleared wherever the fade is past half.
    """
    p = patch_PPC.shape[0]
    yy, xx = np.mgrid[0:p, 0:p].astype(np.float32)
    py, px = rng.uniform(0.15 * p, 0.85 * p, size=2)
    angle = float(rng.uniform(-math.pi, math.pi))
    ny, nx = math.sin(angle), math.cos(angle)  # towards the inside
    if rng.random() < 0.5:
        inside_px = (yy - py) * ny + (xx - px) * nx
    else:
        radius = float(rng.uniform(0.5, 3.0)) * p
        cy, cx = py + radius * ny, px + radius * nx  # the centre lies inside, the edge passes (py, px)
        inside_px = radius - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    weight = np.clip(inside_px / float(rng.uniform(1.0, 3.0)) + 0.5, 0.0, 1.0)[..., None]
    level = float(patch_PPC.min()) - float(rng.uniform(*augment.field_cut_depth))
    flat = level + rng.normal(0.0, float(rng.uniform(0.0, 0.15)), size=patch_PPC.shape).astype(np.float32)
    patch_PPC[...] = weight * patch_PPC + (1.0 - weight) * flat
    mask_PP[weight[..., 0] < 0.5] = 0.0


class PatchPool:
    """Cases held in memory to cut training patches from; once `max_cases` are held, each new case
    replaces the oldest (a ring), so a stream of synthetic pairs keeps the pool fresh."""

    def __init__(self, max_cases: int | None = None) -> None:
        if max_cases is not None and max_cases < 1:
            raise ValueError(f"PatchPool: max_cases={max_cases} must be >= 1")
        self.max_cases = max_cases
        self._images_HWC: list[np.ndarray] = []
        self._masks_HW: list[np.ndarray] = []
        self._foreground: list[np.ndarray] = []  # flat indices of vessel pixels, per case
        self._next = 0  # ring position of the next replacement
        self.num_added = 0  # cases ever added (count)

    def __len__(self) -> int:
        return len(self._images_HWC)

    def add(self, image_3HW: np.ndarray, mask_HW: np.ndarray) -> None:
        """Add one prepared case: float32 3xHxW (prepare_image) and its HxW mask (non-zero = vessel)."""
        if image_3HW.ndim != 3 or image_3HW.shape[0] != 3 or image_3HW.dtype != np.float32:
            raise ValueError(
                f"PatchPool.add: image must be float32 3xHxW, got {image_3HW.dtype} {image_3HW.shape}"
            )
        if mask_HW.shape != image_3HW.shape[1:]:
            raise ValueError(
                f"PatchPool.add: mask {mask_HW.shape} does not match image {image_3HW.shape[1:]}"
            )
        mask = (mask_HW > 0).astype(np.uint8)
        entry = (np.ascontiguousarray(image_3HW.transpose(1, 2, 0)), mask, np.flatnonzero(mask))
        if self.max_cases is None or len(self) < self.max_cases:
            self._images_HWC.append(entry[0])
            self._masks_HW.append(entry[1])
            self._foreground.append(entry[2])
        else:
            i = self._next
            self._images_HWC[i], self._masks_HW[i], self._foreground[i] = entry
            self._next = (i + 1) % self.max_cases
        self.num_added += 1

    def _centre(
        self, rng: np.random.Generator, case: int, patch_size_px: int, foreground: bool
    ) -> tuple[int, int]:
        """Patch centre (y, x): on a random vessel pixel when asked (and there is one), else uniform; then
        moved the least needed to keep the patch inside the image where the image is big enough."""
        height, width = self._masks_HW[case].shape
        fg = self._foreground[case]
        if foreground and fg.size:
            y, x = divmod(int(fg[int(rng.integers(fg.size))]), width)
        else:
            y, x = int(rng.integers(height)), int(rng.integers(width))
        half = patch_size_px // 2
        y = min(max(y, half), height - (patch_size_px - half)) if height >= patch_size_px else height // 2
        x = min(max(x, half), width - (patch_size_px - half)) if width >= patch_size_px else width // 2
        return y, x

    def sample(
        self,
        rng: np.random.Generator,
        num_patches: int,
        patch_size_px: int,
        foreground_fraction: float,
        augment: AugmentConfig | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """num_patches patches: (image float32 Nx3xPxP, mask float32 Nx1xPxP {0, 1})."""
        if len(self) == 0:
            raise ValueError("PatchPool.sample: the pool holds no cases")
        p = patch_size_px
        images_N3PP = np.empty((num_patches, 3, p, p), np.float32)
        masks_N1PP = np.empty((num_patches, 1, p, p), np.float32)
        for n in range(num_patches):
            case = int(rng.integers(len(self)))
            foreground = bool(rng.random() < foreground_fraction)
            centre = self._centre(rng, case, p, foreground)
            matrix, cut_px = _affine(rng, centre, p, augment)
            flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
            patch_PP3 = cv2.warpAffine(
                self._images_HWC[case],
                matrix,
                (cut_px, cut_px),
                flags=flags,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0,
            )
            mask_PP = cv2.warpAffine(
                self._masks_HW[case].astype(np.float32),
                matrix,
                (cut_px, cut_px),
                flags=flags,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0,
            )
            if cut_px != p:  # a zoom out: area-average the full-resolution cut down to the patch
                patch_PP3 = cv2.resize(patch_PP3, (p, p), interpolation=cv2.INTER_AREA).reshape(p, p, -1)
                mask_PP = cv2.resize(mask_PP, (p, p), interpolation=cv2.INTER_AREA)
            if augment is not None:
                # The draw only happens when the cut is on, so other configs keep their random stream.
                if augment.field_cut_prob > 0 and rng.random() < augment.field_cut_prob:
                    _cut_field(patch_PP3, mask_PP, rng, augment)
                _augment_intensity(patch_PP3, rng, augment)
            images_N3PP[n] = patch_PP3.transpose(2, 0, 1)
            masks_N1PP[n, 0] = mask_PP >= 0.5
        return images_N3PP, masks_N1PP

"""Image and mask files in, PNG bytes in and out: the one place where pixel data enters the data engine.

    image = read_image("case/01.tif")   # uint8 HxW (grey) or HxWx3 (BGR), whatever the file held
    mask = read_mask("case/01_gt.gif")  # uint8 HxW, vessel 255, background 0
    data = encode_png(mask, compression=1); mask_again = decode_png(data, grayscale=True)
    data = encode_png(image, compression=1, rle=True, row_filter="avg")  # fast, small (shard build)

Formats: PNG, JPEG, TIFF, GIF, BMP, PPM/PGM/PBM (anything OpenCV decodes, with PIL as the fallback), 8 or 16
bit (and float or signed TIFFs), grey, colour, grey+alpha, RGBA, palette.

Conventions, decided once here so every stage sees the same pixels:
- Colour comes back in OpenCV's BGR order; alpha is dropped (vessel images never mean anything by it).
- A colour file whose three channels are identical (grey GIFs, grey JPEGs saved as RGB, grey+alpha PNGs)
  comes back as HxW grey, since that is what it holds.
- Deeper than 8 bit (16-bit, signed, float): stretched linearly from the image's own minimum to its own
  maximum onto 0..255. Dividing by 257 would assume the full 16-bit range is used, but medical 16-bit
  files usually hold 10-12 significant bits (0..1023 or 0..4095): divided by 257 they would come back
  nearly black. The per-image stretch keeps the contrast; absolute intensity is not comparable across
  16-bit files anyway.
- Pixel data as stored: JPEG EXIF orientation is ignored, so an image and the mask drawn on its array
  line up the way annotation tools save them.
- Masks are never read through the 8-bit conversion: the raw values are thresholded at half the file's
  own maximum (vessel = value > max / 2), so 0/1, 0/255, 0/65535, palette and colour masks all work and
  stray grey edge pixels fall on the nearer side. A label map (a few small whole values, such as artery 1 /
  vein 2, or coronary segment numbers) loses its classes at or below half the largest: read_mask warns,
  naming the file and the labels dropped, so that it can be binarised first.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger("data_engine.io")

# A mask whose values are all whole numbers up to this is taken for a label map (read_mask's warning).
LABEL_MAP_MAX = 64

# The 8-byte signature every PNG stream starts with (PNG spec, section 5.2).
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# File suffixes read_task and friends treat as images (lower case).
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".gif",
    ".bmp",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
)


def _read_raw(path: str | Path) -> np.ndarray:
    """Pixel array exactly as decoded (any dtype; HxW, HxWxC with C in 1..4, BGR(A) order)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file (expected an image file: {', '.join(IMAGE_SUFFIXES)})")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path}: file is empty (0 bytes), expected an image")
    # imdecode from bytes rather than imread: works for any path encoding and reads the file once.
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    # OpenCV hands back CMYK TIFFs as 4 raw ink channels, which would pass for BGRA; PIL converts them.
    is_tiff = data[:4] in (b"II*\x00", b"MM\x00*")
    if array is None or (is_tiff and array.ndim == 3 and array.shape[2] == 4 and _pil_mode(path) == "CMYK"):
        array = _read_with_pil(path)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or array.size == 0 or (array.ndim == 3 and array.shape[2] not in (2, 3, 4)):
        raise ValueError(f"{path}: decoded to an unsupported pixel layout {array.shape} {array.dtype}")
    return array


def _pil_mode(path: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return str(im.mode)
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def _read_with_pil(path: Path) -> np.ndarray:
    """Decode with PIL where OpenCV cannot; palette applied, result in OpenCV's layout (BGR / BGRA)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            opened.seek(0)  # first frame of animated GIFs and multi-page TIFFs
            im: Image.Image = opened
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            elif im.mode == "1":
                im = im.convert("L")
            elif im.mode == "PA":
                im = im.convert("RGBA")
            array = np.array(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e}); supported: {', '.join(IMAGE_SUFFIXES)}") from e
    if array.ndim == 3 and array.shape[2] == 3:
        array = array[:, :, ::-1]
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, [2, 1, 0, 3]]
    return np.ascontiguousarray(array)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """8-bit version of a decoded array: uint8 as is, anything else stretched from its min..max to 0..255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    values = array.astype(np.float64)
    np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if high <= low:  # a constant image has no contrast to keep
        return np.zeros(array.shape, np.uint8)
    values -= low
    values *= 255.0 / (high - low)
    return np.rint(values).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as uint8: HxW (grey) or HxWx3 (BGR). See the module docstring for conventions.

    Raises FileNotFoundError for a missing file, ValueError for an empty or undecodable one.
    """
    array = _read_raw(path)
    if array.ndim == 3:
        if array.shape[2] == 2:  # grey + alpha from the PIL path
            array = array[:, :, 0]
        else:
            array = array[:, :, :3]
            if np.array_equal(array[:, :, 0], array[:, :, 1]) and np.array_equal(
                array[:, :, 0], array[:, :, 2]
            ):
                array = array[:, :, 0]
    return np.ascontiguousarray(_to_uint8(array))


def read_mask(path: str | Path) -> np.ndarray:
    """Read a vessel mask as uint8 HxW {0, 255}: a pixel is vessel where its value > half the file's maximum.

    Colour masks use the brightest channel at each pixel; a mask drawn only in the alpha channel uses the
    alpha. A palette GIF/PNG whose palette maps every index to black (some tools write label indices
    {0, 1} with an empty palette) falls back to the indices themselves.
    """
    array = _read_raw(path)
    if array.ndim == 3:
        colour = array[:, :, :3] if array.shape[2] >= 3 else array[:, :, :1]
        values = colour.max(axis=2)
        if array.shape[2] in (2, 4) and not values.any():
            values = array[:, :, -1]
    else:
        values = array
    if values.dtype.kind == "f":
        values = np.nan_to_num(values, nan=0.0)
    if not values.any():
        values = _palette_indices(Path(path), values)
    high = values.max()
    if high <= 0:
        return np.zeros(values.shape, np.uint8)
    # Compare in float64 so 0/1 masks (half = 0.5) and 16-bit masks threshold the same way.
    above = values.astype(np.float64) > float(high) / 2.0
    if 1 < high <= LABEL_MAP_MAX:
        _warn_dropped_labels(path, values, above)
    return np.where(above, np.uint8(255), np.uint8(0))


def _warn_dropped_labels(path: str | Path, values: np.ndarray, above: np.ndarray) -> None:
    """Warn when a label-map mask (whole values 0..LABEL_MAP_MAX) has labelled pixels at or below half its
    maximum, which the half-maximum rule makes background."""
    labels = np.unique(values)
    if not np.array_equal(labels, np.round(labels)):
        return
    dropped = (values > 0) & ~above
    if dropped.any():
        lost = [int(v) for v in np.unique(values[dropped])]
        log.warning(
            "mask %s looks like a label map (values %s): labels %s, %.0f %% of its labelled pixels, are at "
            "or below half the maximum and read as background; binarise it first (every label > 0 -> 255) "
            "if they are vessels too",
            path,
            ", ".join(str(int(v)) for v in labels),
            ", ".join(map(str, lost)),
            100.0 * np.count_nonzero(dropped) / np.count_nonzero(values > 0),
        )


def _palette_indices(path: Path, values: np.ndarray) -> np.ndarray:
    """Palette indices of a palette image whose colours all decoded to black; `values` otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode != "P":
                return values
            indices = np.array(im)
    except (UnidentifiedImageError, OSError, ValueError):
        return values
    return indices if indices.shape == values.shape else values


def _check_png_array(array: np.ndarray) -> None:
    if not isinstance(array, np.ndarray):
        raise ValueError(f"encode_png: expected a numpy array, got {type(array).__name__}")
    if array.dtype != np.uint8:
        raise ValueError(
            f"encode_png: array must be uint8 (0..255), got {array.dtype}; convert it explicitly first"
        )
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3))):
        raise ValueError(f"encode_png: array must be HxW or HxWx3 (BGR), got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"encode_png: array has an empty side, shape {array.shape}")


# PNG row filters (PNG spec, section 9) by name, for `encode_png(..., row_filter=...)`.
PNG_ROW_FILTERS: dict[str, int] = {
    "none": cv2.IMWRITE_PNG_FILTER_NONE,
    "sub": cv2.IMWRITE_PNG_FILTER_SUB,
    "up": cv2.IMWRITE_PNG_FILTER_UP,
    "avg": cv2.IMWRITE_PNG_FILTER_AVG,
    "paeth": cv2.IMWRITE_PNG_FILTER_PAETH,
}


def encode_png(
    array: np.ndarray, compression: int, *, rle: bool = False, row_filter: str | None = None
) -> bytes:
    """Lossless PNG bytes of a uint8 HxW (grey) or HxWx3 (BGR) array; compression 0 (stored) to 9 (zlib).

    By default zlib runs its default strategy at `compression`, and libpng picks a row filter per row
    (tries them all). `rle=True` switches zlib to run-length matching (distance 1 only): levels 1-9 then
    give the same bytes (0 still stores). `row_filter` (a PNG_ROW_FILTERS name) fixes one filter for every
    row. At 512 px, rle with "avg" for images and "none" for masks encodes ~2.5x faster than level 1's
    default and is smaller (BENCHMARKS.md, "PNG strategy and uint8 reader batches"). Any choice decodes
    to the same pixels.
    """
    _check_png_array(array)
    if (
        isinstance(compression, bool)
        or not isinstance(compression, int | np.integer)
        or not 0 <= compression <= 9
    ):
        raise ValueError(f"encode_png: compression={compression!r} must be an integer 0..9 (zlib level)")
    # Setting the level also resets OpenCV's strategy to zlib's default; a strategy must come after it.
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(compression)]
    if rle:
        params += [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    if row_filter is not None:
        if row_filter not in PNG_ROW_FILTERS:
            raise ValueError(
                f"encode_png: row_filter={row_filter!r} must be one of {sorted(PNG_ROW_FILTERS)} or None"
            )
        params += [cv2.IMWRITE_PNG_FILTER, PNG_ROW_FILTERS[row_filter]]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array), params)
    if not ok:
        raise ValueError(f"encode_png: OpenCV could not encode an array of shape {array.shape}")
    return buf.tobytes()


def decode_png(data: bytes, grayscale: bool) -> np.ndarray:
    """Decode PNG bytes written by `encode_png`: uint8 HxW, or as stored (HxW or HxWx3 BGR) if not grayscale.

    `grayscale=True` is for masks and FOVs: a colour PNG there is an error, not something to convert,
    because converting would hide a writer bug. 16-bit or alpha PNGs are errors in either case.
    """
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise ValueError("decode_png: expected non-empty PNG bytes")
    if bytes(data[:8]) != _PNG_SIGNATURE:
        raise ValueError(f"decode_png: data does not start with the PNG signature (got {bytes(data[:8])!r})")
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ValueError(f"decode_png: corrupt or truncated PNG ({len(data)} bytes)")
    if array.dtype != np.uint8:
        raise ValueError(f"decode_png: expected an 8-bit PNG, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] != 3:
        raise ValueError(f"decode_png: expected 1 or 3 channels, got {array.shape[2]} (alpha is not allowed)")
    if grayscale and array.ndim != 2:
        raise ValueError(f"decode_png: expected a single-channel PNG (mask / fov), got shape {array.shape}")
    return array

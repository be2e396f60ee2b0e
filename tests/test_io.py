"""data_engine.io: every supported file format reads back to the right uint8 pixels; PNG codec checks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from data_engine.io import decode_png, encode_png, read_image, read_mask

RNG = np.random.default_rng(0)
GREY = (RNG.random((19, 27)) * 255).astype(np.uint8)
COLOUR_BGR = (RNG.random((19, 27, 3)) * 255).astype(np.uint8)
VESSELS = RNG.random((19, 27)) > 0.7  # True = vessel


def stretched(values: np.ndarray) -> np.ndarray:
    """What read_image promises for deep images: linear min..max -> 0..255, rounded."""
    v = values.astype(np.float64)
    return np.rint((v - v.min()) * 255.0 / (v.max() - v.min())).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".pgm"])
def test_grey_8bit_lossless_formats_read_exactly(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"grey{suffix}"
    assert cv2.imwrite(str(path), GREY)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == GREY.shape
    np.testing.assert_array_equal(out, GREY)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".ppm"])
def test_colour_8bit_lossless_formats_read_exactly_as_bgr(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"colour{suffix}"
    assert cv2.imwrite(str(path), COLOUR_BGR)
    np.testing.assert_array_equal(read_image(path), COLOUR_BGR)


def test_rgb_written_by_pil_comes_back_in_bgr_order(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200  # pure red in RGB
    Image.fromarray(rgb).save(tmp_path / "red.png")
    out = read_image(tmp_path / "red.png")
    assert out.shape == (8, 8, 3) and (out[..., 2] == 200).all() and (out[..., :2] == 0).all()


@pytest.mark.parametrize("suffix", [".png", ".tif", ".pgm"])
def test_16bit_grey_is_stretched_by_its_own_range(tmp_path: Path, suffix: str) -> None:
    values = (100 + RNG.random((19, 27)) * 3900).astype(np.uint16)  # a 12-bit detector's range
    path = tmp_path / f"deep{suffix}"
    assert cv2.imwrite(str(path), values)
    out = read_image(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, stretched(values))
    assert out.min() == 0 and out.max() == 255


def test_16bit_colour_png_keeps_channel_order_and_joint_range(tmp_path: Path) -> None:
    values = (RNG.random((19, 27, 3)) * 60000).astype(np.uint16)
    values[..., 2] += 5000  # red brightest
    assert cv2.imwrite(str(tmp_path / "c16.png"), values)
    out = read_image(tmp_path / "c16.png")
    np.testing.assert_array_equal(out, stretched(values))


def test_float_and_signed_tiffs_are_stretched(tmp_path: Path) -> None:
    floats = RNG.random((19, 27)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", floats)
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif"), stretched(floats))
    signed = (RNG.random((19, 27)) * 2000 - 1000).astype(np.int16)
    tifffile.imwrite(tmp_path / "s.tif", signed)
    np.testing.assert_array_equal(read_image(tmp_path / "s.tif"), stretched(signed))


def test_jpeg_colour_and_grey(tmp_path: Path) -> None:
    smooth = cv2.GaussianBlur(COLOUR_BGR, (0, 0), 3)
    assert cv2.imwrite(str(tmp_path / "c.jpg"), smooth, [cv2.IMWRITE_JPEG_QUALITY, 98])
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == smooth.shape
    assert np.abs(out.astype(int) - smooth).mean() < 3
    grey = cv2.GaussianBlur(GREY, (0, 0), 3)
    assert cv2.imwrite(str(tmp_path / "g.jpeg"), grey, [cv2.IMWRITE_JPEG_QUALITY, 98])
    out = read_image(tmp_path / "g.jpeg")
    assert out.shape == grey.shape and np.abs(out.astype(int) - grey).mean() < 3


def test_rgba_drops_alpha_and_grey_alpha_is_grey(tmp_path: Path) -> None:
    rgba = np.dstack([COLOUR_BGR[..., ::-1], (RNG.random((19, 27)) * 255).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), COLOUR_BGR)
    la = np.dstack([GREY, np.full_like(GREY, 7)])
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), GREY)


def test_grey_gif_and_palette_colour_gif(tmp_path: Path) -> None:
    Image.fromarray(GREY).save(tmp_path / "g.gif")
    np.testing.assert_array_equal(read_image(tmp_path / "g.gif"), GREY)  # 3 equal channels -> grey
    pal = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0])  # black, white, red (RGB)
    pal.save(tmp_path / "p.gif")
    out = read_image(tmp_path / "p.gif")
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [255, 255, 255], [0, 0, 255]])


def test_format_opencv_cannot_read_falls_back_to_pil(tmp_path: Path) -> None:
    Image.fromarray(GREY).save(tmp_path / "g.tga")
    assert cv2.imread(str(tmp_path / "g.tga"), cv2.IMREAD_UNCHANGED) is None
    np.testing.assert_array_equal(read_image(tmp_path / "g.tga"), GREY)


def test_cmyk_tiff_is_converted_not_taken_for_bgra(tmp_path: Path) -> None:
    rgb = COLOUR_BGR[..., ::-1]
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    expected = np.array(Image.open(tmp_path / "cmyk.tif").convert("RGB"))[..., ::-1]
    np.testing.assert_array_equal(read_image(tmp_path / "cmyk.tif"), expected)


# ---- masks


def expected_mask() -> np.ndarray:
    return np.where(VESSELS, 255, 0).astype(np.uint8)


@pytest.mark.parametrize(
    "name, values",
    [
        ("m01.png", VESSELS.astype(np.uint8)),
        ("m255.png", VESSELS.astype(np.uint8) * 255),
        ("m255.bmp", VESSELS.astype(np.uint8) * 255),
        ("m16.png", VESSELS.astype(np.uint16) * 65535),
        ("m16_01.tif", VESSELS.astype(np.uint16)),
    ],
)
def test_mask_value_conventions(tmp_path: Path, name: str, values: np.ndarray) -> None:
    assert cv2.imwrite(str(tmp_path / name), values)
    out = read_mask(tmp_path / name)
    assert out.dtype == np.uint8 and out.shape == VESSELS.shape
    np.testing.assert_array_equal(out, expected_mask())


def test_one_bit_png_mask(tmp_path: Path) -> None:
    Image.fromarray(VESSELS).save(tmp_path / "m1.png")  # PIL mode "1": a 1-bit PNG
    np.testing.assert_array_equal(read_mask(tmp_path / "m1.png"), expected_mask())


def test_palette_gif_mask_with_indices_0_1(tmp_path: Path) -> None:
    im = Image.fromarray(VESSELS.astype(np.uint8), "P")
    im.putpalette([0, 0, 0, 255, 255, 255])
    im.save(tmp_path / "m.gif")
    assert np.array(Image.open(tmp_path / "m.gif")).max() == 1  # PIL alone would give {0, 1}
    np.testing.assert_array_equal(read_mask(tmp_path / "m.gif"), expected_mask())


def test_palette_mask_whose_palette_is_all_black_uses_the_indices(tmp_path: Path) -> None:
    im = Image.fromarray(VESSELS.astype(np.uint8), "P")
    im.putpalette([0, 0, 0, 0, 0, 0])
    im.save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), expected_mask())


def test_mask_with_stray_grey_pixels_thresholds_at_half_max(tmp_path: Path) -> None:
    values = VESSELS.astype(np.uint8) * 255
    values[0, :4] = [100, 127, 128, 200]  # edge / noise pixels: 127.5 is the threshold
    assert cv2.imwrite(str(tmp_path / "m.png"), values)
    out = read_mask(tmp_path / "m.png")
    np.testing.assert_array_equal(out[0, :4], [0, 0, 255, 255])
    np.testing.assert_array_equal(out[1:], expected_mask()[1:])


def test_label_map_mask_warns_about_the_labels_it_drops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    labels = np.zeros(VESSELS.shape, np.uint8)
    labels[VESSELS] = 1  # e.g. arteries
    labels[0, :3] = 2  # e.g. veins
    assert cv2.imwrite(str(tmp_path / "av.png"), labels)
    with caplog.at_level("WARNING", logger="data_engine.io"):
        out = read_mask(tmp_path / "av.png")
    # the contract (half the maximum) holds: only label 2 is vessel, and the warning says what was lost
    assert out[0, :3].tolist() == [255, 255, 255] and np.count_nonzero(out) == 3
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "av.png looks like a label map (values 0, 1, 2): labels 1," in message and "binarise it" in message
    # binary masks of any coding, and grey edge pixels of an 8-bit mask, do not warn
    caplog.clear()
    grey = VESSELS.astype(np.uint8) * 255
    grey[0, :2] = [100, 127]
    for name, values in (
        ("m01.png", VESSELS.astype(np.uint8)),
        ("m255.png", grey),
        ("m02.png", labels * 0 + 2 * VESSELS),
    ):
        assert cv2.imwrite(str(tmp_path / name), values.astype(np.uint8))
        with caplog.at_level("WARNING", logger="data_engine.io"):
            read_mask(tmp_path / name)
    assert not caplog.records


def test_colour_mask_uses_the_brightest_channel(tmp_path: Path) -> None:
    colour = np.zeros((*VESSELS.shape, 3), np.uint8)
    colour[VESSELS, 2] = 255  # red vessels on black (BGR)
    assert cv2.imwrite(str(tmp_path / "m.png"), colour)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), expected_mask())


def test_empty_mask_reads_as_all_zero(tmp_path: Path) -> None:
    assert cv2.imwrite(str(tmp_path / "m.png"), np.zeros((5, 6), np.uint8))
    out = read_mask(tmp_path / "m.png")
    assert out.shape == (5, 6) and not out.any()


# ---- errors


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_mask(tmp_path / "nope.png")


def test_unreadable_empty_or_folder_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match=r"junk\.png.*not a readable image"):
        read_image(tmp_path / "junk.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.jpg.*empty"):
        read_mask(tmp_path / "empty.jpg")
    with pytest.raises(ValueError, match="not a file"):
        read_image(tmp_path)


# ---- PNG codec


@pytest.mark.parametrize("array", [GREY, COLOUR_BGR, expected_mask()])
def test_png_round_trip_is_lossless(array: np.ndarray) -> None:
    data = encode_png(array, compression=1)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out = decode_png(data, grayscale=array.ndim == 2)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)


def test_png_compression_levels_decode_the_same() -> None:
    mask = np.kron(expected_mask(), np.ones((8, 8), np.uint8))  # compressible, unlike noise
    fast, small = encode_png(mask, 0), encode_png(mask, 9)
    assert len(small) < len(fast)
    np.testing.assert_array_equal(decode_png(fast, True), mask)
    np.testing.assert_array_equal(decode_png(small, True), mask)


def test_encode_png_rejects_bad_arrays_and_levels() -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_png(GREY.astype(np.float32), 1)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(GREY.astype(np.uint16), 1)
    with pytest.raises(ValueError, match="HxW or HxWx3"):
        encode_png(np.zeros((4, 4, 4), np.uint8), 1)
    with pytest.raises(ValueError, match="empty side"):
        encode_png(np.zeros((0, 4), np.uint8), 1)
    with pytest.raises(ValueError, match="0..9"):
        encode_png(GREY, 10)


def test_decode_png_rejects_bad_data() -> None:
    with pytest.raises(ValueError, match="signature"):
        decode_png(b"GIF89a....", grayscale=True)
    with pytest.raises(ValueError, match="non-empty"):
        decode_png(b"", grayscale=True)
    with pytest.raises(ValueError, match="corrupt"):
        decode_png(encode_png(GREY, 1)[:40], grayscale=True)
    with pytest.raises(ValueError, match="single-channel"):
        decode_png(encode_png(COLOUR_BGR, 1), grayscale=True)
    ok, deep = cv2.imencode(".png", GREY.astype(np.uint16) * 257)
    assert ok
    with pytest.raises(ValueError, match="8-bit"):
        decode_png(deep.tobytes(), grayscale=True)

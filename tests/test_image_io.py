"""cdcl_hf.image_io: lossless file reading, channel-axis coercion, per-channel files, `image` column values."""

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from cdcl_hf import screen_data
from cdcl_hf.image_io import (
    ImageReadError,
    ImageShapeError,
    MissingImageError,
    ScreenDataError,
    decode_image,
    read_image,
    read_image_file,
    squeeze_plane,
    to_channels_first,
)

rng = np.random.default_rng(0)


def random_pixels(dtype, shape):
    pixels = rng.integers(0, np.iinfo(dtype).max + 1, size=shape, dtype=dtype)
    pixels.flat[0], pixels.flat[1] = 0, np.iinfo(dtype).max  # the extremes must survive too
    return pixels


def write(path, pixels):
    if path.suffix == ".npy":
        np.save(path, pixels)
    elif path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, pixels, photometric="minisblack" if pixels.ndim == 2 or pixels.shape[-1] != 3 else "rgb")
    else:
        Image.fromarray(pixels).save(path)
    return path


# ---- reading one file --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff", ".npy", ".pgm"])
def test_single_plane_round_trip_is_exact(tmp_path, dtype, suffix):
    pixels = random_pixels(dtype, (17, 23))
    read = read_image_file(write(tmp_path / f"plane{suffix}", pixels))
    assert read.dtype == dtype and read.shape == (17, 23)
    np.testing.assert_array_equal(read, pixels)


def test_pillow_int32_widening_of_16_bit_greyscale_is_undone(tmp_path):
    pixels = random_pixels(np.uint16, (9, 11))
    path = write(tmp_path / "plane.pgm", pixels)
    with Image.open(path) as image:
        assert image.mode == "I" and np.asarray(image).dtype == np.int32  # what a plain np.asarray gives
    read = read_image_file(path)
    assert read.dtype == np.uint16
    np.testing.assert_array_equal(read, pixels)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_multi_channel_npy_and_tiff_round_trip(tmp_path, dtype):
    channels_first = random_pixels(dtype, (4, 20, 18))
    channels_last = np.moveaxis(channels_first, 0, -1).copy()
    for name, stored in [("cf.tif", channels_first), ("cl.tif", channels_last), ("cf.npy", channels_first),
                         ("cl.npy", channels_last)]:
        path = write(tmp_path / name, stored)
        np.testing.assert_array_equal(read_image_file(path), stored)
        image = read_image(path)
        assert image.dtype == dtype
        np.testing.assert_array_equal(image, channels_first)


def test_multi_page_tiff_is_one_channel_per_page(tmp_path):
    pages = random_pixels(np.uint16, (3, 16, 14))
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tiff:
        for page in pages:
            tiff.write(page, photometric="minisblack")
    with tifffile.TiffFile(tmp_path / "pages.tif") as tiff:
        assert len(tiff.pages) == 3
    np.testing.assert_array_equal(read_image(tmp_path / "pages.tif"), pages)


def test_tiff_with_a_thumbnail_reads_the_main_image(tmp_path):
    main, thumbnail = random_pixels(np.uint16, (3, 32, 32)), random_pixels(np.uint16, (8, 8))
    with tifffile.TiffWriter(tmp_path / "field.tif") as tiff:
        tiff.write(main, photometric="minisblack")
        tiff.write(thumbnail, photometric="minisblack")
    np.testing.assert_array_equal(read_image(tmp_path / "field.tif"), main)


def test_rgb_png_reads_channels_last_and_becomes_channels_first(tmp_path):
    rgb = random_pixels(np.uint8, (12, 10, 3))
    path = write(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(read_image_file(path), rgb)
    np.testing.assert_array_equal(read_image(path), np.moveaxis(rgb, -1, 0))


def test_big_endian_npy_comes_back_native(tmp_path):
    pixels = random_pixels(np.uint16, (3, 8, 8))
    path = write(tmp_path / "be.npy", pixels.astype(">u2"))
    read = read_image_file(path)
    assert read.dtype == np.dtype(np.uint16) and read.dtype.isnative
    np.testing.assert_array_equal(read, pixels)


def test_missing_truncated_and_non_image_files_are_named(tmp_path):
    with pytest.raises(MissingImageError, match=r"image file .*nowhere.png does not exist"):
        read_image_file(tmp_path / "nowhere.png")
    with pytest.raises(FileNotFoundError):  # MissingImageError is also a FileNotFoundError
        read_image(tmp_path / "nowhere.png")

    encoded = io.BytesIO()
    Image.fromarray(random_pixels(np.uint16, (64, 64))).save(encoded, format="PNG")
    (tmp_path / "cut.png").write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    with pytest.raises(ImageReadError, match=r"^cannot read image file .*cut\.png: \w+Error: .*truncated"):
        read_image_file(tmp_path / "cut.png")
    with pytest.raises(ImageReadError, match=r"^metadata.csv line 7: cannot read image file .*cut\.png"):
        read_image(tmp_path / "cut.png", where="metadata.csv line 7")

    np.save(tmp_path / "cut.npy", random_pixels(np.uint16, (3, 32, 32)))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:300])
    with pytest.raises(ImageReadError, match=r"cut\.npy"):
        read_image_file(tmp_path / "cut.npy")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageReadError, match=r"notes\.txt: UnidentifiedImageError"):
        read_image_file(tmp_path / "notes.txt")


# ---- channel axis ------------------------------------------------------------------------------


def test_auto_channel_axis_is_the_short_one():
    first = np.zeros((3, 40, 30), dtype=np.uint16)
    assert to_channels_first(first).shape == (3, 40, 30)
    assert to_channels_first(np.zeros((40, 30, 5), dtype=np.uint8)).shape == (5, 40, 30)
    assert to_channels_first(np.zeros((40, 30), dtype=np.uint8)).shape == (1, 40, 30)
    assert to_channels_first(first) is first  # no copy


@pytest.mark.parametrize("shape", [(3, 16, 3), (30, 20, 25), (16, 3, 16)])
def test_auto_channel_axis_refuses_to_guess(shape):
    array = np.zeros(shape, dtype=np.uint16)
    with pytest.raises(ImageShapeError, match=rf"a.npy: cannot tell the channel axis of shape \({shape[0]}, .*channel_axis="):
        to_channels_first(array, where="a.npy")
    assert to_channels_first(array, "first").shape == shape
    assert to_channels_first(array, "last").shape == (shape[2], shape[0], shape[1])


def test_explicit_channel_axis_overrides_the_rule(tmp_path):
    pixels = random_pixels(np.uint16, (5, 6, 4))  # auto calls the last axis the channels
    path = write(tmp_path / "small.npy", pixels)
    np.testing.assert_array_equal(read_image(path, "first"), pixels)
    np.testing.assert_array_equal(read_image(path), np.moveaxis(pixels, -1, 0))
    with pytest.raises(ImageShapeError, match=r"small.npy: expected a 2-D or 3-D image, got shape \(1, 5, 6, 4\)"):
        read_image(write(tmp_path / "small.npy", pixels[None]))
    with pytest.raises(ValueError, match="channel_axis must be one of"):
        to_channels_first(pixels, "middle")


def test_squeeze_plane():
    plane = np.arange(12, dtype=np.uint16).reshape(3, 4)
    for shaped in (plane, plane[None], plane[..., None]):
        np.testing.assert_array_equal(squeeze_plane(shaped), plane)
    with pytest.raises(ImageShapeError, match=r"f.tif: expected one single-channel 2-D plane, got shape \(2, 3, 4\)"):
        squeeze_plane(np.zeros((2, 3, 4)), where="f.tif")


# ---- one file per channel ----------------------------------------------------------------------


def test_one_file_per_channel(tmp_path):
    planes = [random_pixels(np.uint16, (12, 10)) for _ in range(3)]
    files = [write(tmp_path / "dna.tif", planes[0]), write(tmp_path / "actin.png", planes[1]),
             write(tmp_path / "tubulin.npy", planes[2][None])]  # a (1, H, W) plane is squeezed
    image = read_image(files)
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image, np.stack(planes))
    np.testing.assert_array_equal(read_image([files[0]]), planes[0][None])  # one file: a one-channel image

    write(tmp_path / "small.png", random_pixels(np.uint16, (12, 9)))
    with pytest.raises(ImageShapeError, match=r"row 3: its channel files differ .*dna.tif: \(12, 10\).*small.png: \(12, 9\)"):
        read_image([files[0], tmp_path / "small.png"], where="row 3")
    write(tmp_path / "rgb.png", random_pixels(np.uint8, (12, 10, 3)))
    with pytest.raises(ImageShapeError, match=r"row 3, file .*rgb.png: expected one single-channel 2-D plane"):
        read_image([files[0], tmp_path / "rgb.png"], where="row 3")
    with pytest.raises(MissingImageError, match=r"row 3: image file .*gone.tif does not exist"):
        read_image([files[0], tmp_path / "gone.tif"], where="row 3")


# ---- `image` column values ---------------------------------------------------------------------


def test_decode_image_undoes_widening_and_names_bad_values():
    plane = random_pixels(np.uint16, (6, 7))
    widened = Image.fromarray(plane.astype(np.int32), mode="I")
    decoded = decode_image([widened, Image.fromarray(plane)])
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, np.stack([plane, plane]))
    with pytest.raises(ImageReadError, match=r"row 4, channel 1: cannot decode the stored image"):
        decode_image([{"bytes": encode_png(plane), "path": None}, {"bytes": b"\x89PNG broken", "path": None}],
                     where="row 4")
    with pytest.raises(ImageShapeError, match=r"row 4, channel 0: unsupported pixel type float32"):
        decode_image([plane.astype(np.float32)], where="row 4")
    with pytest.raises(ScreenDataError, match="neither bytes nor path"):
        decode_image([{"bytes": None, "path": None}])


def encode_png(plane):
    buffer = io.BytesIO()
    Image.fromarray(plane).save(buffer, format="PNG")
    return buffer.getvalue()


def test_screen_data_reexports_the_same_objects():
    assert screen_data.decode_image is decode_image
    for error in (ScreenDataError, ImageReadError, ImageShapeError, MissingImageError):
        assert getattr(screen_data, error.__name__) is error
    assert issubclass(screen_data.MissingColumnError, ScreenDataError)

"""RWKVCLIPImageProcessor against a torchvision-free reference of docs/architecture.md §8 written here with PIL."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from rwkv_clip_hf import RWKVCLIPImageProcessor

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def reference_pixels(image: Image.Image, size: int = 224) -> torch.Tensor:
    """§8 step by step: shorter side to `size` (bicubic, longer side truncated), center crop with the offset
    rounded half to even (torchvision), RGB, /255, normalise."""
    width, height = image.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    if new != image.size:
        image = image.resize(new, Image.BICUBIC)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    return (pixels - MEAN[:, None, None]) / STD[:, None, None]


def random_image(width, height, mode, seed=0):
    rng = np.random.default_rng(seed)
    # smooth content plus noise, so that resizing and cropping offsets matter
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 7 + yy * 3) % 256, (xx * 2 + yy * 5) % 256, (xx * yy) % 256], axis=-1)
    pixels = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    rgb = Image.fromarray(pixels, "RGB")
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        return Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    if mode == "LA":
        return rgb.convert("RGBA").convert("LA")
    if mode == "P":
        return rgb.quantize(colors=64)
    return rgb.convert(mode)


SIZES = [(300, 227), (227, 300), (224, 224), (261, 400), (100, 50), (1000, 224), (225, 500), (7, 5)]
MODES = ["RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "YCbCr"]


@pytest.fixture(scope="module")
def processor():
    return RWKVCLIPImageProcessor()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_pil_images_match_reference(processor, mode, size):
    image = random_image(*size, mode=mode)
    got = processor(image, return_tensors="pt")["pixel_values"]
    assert got.shape == (1, 3, 224, 224) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], reference_pixels(image), rtol=0, atol=1e-5)


def test_batches_and_other_crop_sizes():
    processor = RWKVCLIPImageProcessor(size={"shortest_edge": 64}, crop_size=64)
    images = [random_image(90, 71, "RGB", seed=i) for i in range(3)]
    got = processor(images, return_tensors="pt")["pixel_values"]
    assert got.shape == (3, 3, 64, 64)
    for row, image in zip(got, images):
        torch.testing.assert_close(row, reference_pixels(image, 64), rtol=0, atol=1e-5)


def test_arrays_and_tensors_equal_pil(processor):
    image = random_image(300, 227, "RGB")
    hwc = np.array(image)
    expected = reference_pixels(image)
    for variant in (
        hwc,
        hwc.transpose(2, 0, 1),
        torch.from_numpy(hwc.copy()),
        torch.from_numpy(hwc.copy()).permute(2, 0, 1),
    ):
        torch.testing.assert_close(
            processor(variant, return_tensors="pt")["pixel_values"][0], expected, rtol=0, atol=1e-5
        )
    gray = np.array(image.convert("L"))
    torch.testing.assert_close(
        processor(gray, return_tensors="pt")["pixel_values"][0],
        reference_pixels(image.convert("L")),
        rtol=0,
        atol=1e-5,
    )


def float_reference(channels: np.ndarray, size: int = 224) -> torch.Tensor:
    """Float images: the same resize and crop per channel in PIL's float mode, no 8-bit rounding."""
    planes = [reference_plane(Image.fromarray(c.astype(np.float32), "F"), size) for c in channels]
    pixels = torch.from_numpy(np.stack(planes))
    pixels = pixels.repeat(3, 1, 1) if pixels.shape[0] == 1 else pixels[:3]
    return (pixels / 255 - MEAN[:, None, None]) / STD[:, None, None]


def reference_plane(plane: Image.Image, size: int) -> np.ndarray:
    width, height = plane.size
    new = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    plane = plane.resize(new, Image.BICUBIC)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return np.array(plane.crop((left, top, left + size, top + size)), dtype=np.float32)


def test_float_arrays_are_resized_without_rounding(processor):
    rng = np.random.default_rng(3)
    image = rng.random((3, 131, 170), dtype=np.float32)
    got = processor(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(got, float_reference(image * 255), rtol=0, atol=1e-5)


def test_sixteen_bit_images_are_scaled_not_clipped(processor):
    # a deliberate difference from the original, whose PIL conversion clips 16-bit values above 255 to white
    rng = np.random.default_rng(4)
    eight_bit = rng.integers(0, 256, (150, 190)).astype(np.uint16)
    sixteen = Image.fromarray(eight_bit * 257)
    assert sixteen.mode.startswith("I;16")
    got = processor(sixteen, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(got, float_reference(eight_bit[None].astype(np.float32)), rtol=0, atol=1e-5)
    # uint16 arrays take the same path
    got_array = processor(eight_bit * 257, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(got_array, got, rtol=0, atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    from transformers import AutoImageProcessor

    processor = RWKVCLIPImageProcessor(size={"shortest_edge": 96}, crop_size=96)
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is RWKVCLIPImageProcessor
    image = random_image(120, 99, "RGBA")
    torch.testing.assert_close(
        loaded(image, return_tensors="pt")["pixel_values"], processor(image, return_tensors="pt")["pixel_values"]
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        (3, "got a int"),
        ({"image": 1}, "got a dict"),
        (["a", 3.0], "path|URL|list"),
        (np.zeros((5, 5, 7), dtype=np.uint8), "channel axis"),
        (np.zeros((2, 3, 3, 3, 3), dtype=np.uint8), "shape"),
        (np.full((3, 8, 8), 2.0, dtype=np.float32), r"\[0, 1\]"),
        (np.zeros((8, 8, 3), dtype=np.int64), "dtype"),
        ("/nonexistent/picture.png", "path"),
    ],
)
def test_clear_errors_for_non_images(processor, bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        processor(bad)


def _with_nan(array):
    array = array.copy()
    array.flat[17] = np.nan
    return array


@pytest.mark.parametrize(
    "bad, message",
    [
        (_with_nan(np.full((3, 8, 8), 0.5, dtype=np.float32)), r"float images must not hold NaN, got 1 NaN"),
        (torch.from_numpy(_with_nan(np.full((8, 8, 3), 0.5, dtype=np.float64))), r"must not hold NaN"),
        (np.full((3, 8, 8), np.inf, dtype=np.float32), r"\[0, 1\], got range \[inf, inf\]"),
        (
            Image.fromarray(_with_nan(np.full((8, 8), 0.5, dtype=np.float32)), "F"),
            r'PIL "F" \(float\) images must not hold NaN',
        ),
        (
            Image.fromarray(np.full((8, 8), 3.0, dtype=np.float32), "F"),
            r'PIL "F" \(float\) images must hold values in \[0, 1\], got range \[3.0, 3.0\]',
        ),
        (Image.new("RGB", (0, 0)), r"empty image \(0x0 PIL image\)"),
        (Image.new("L", (5, 0)), r"empty image \(5x0 PIL image\)"),
    ],
    ids=["nan-array", "nan-tensor", "inf-array", "nan-pil-f", "range-pil-f", "empty-rgb", "empty-l"],
)
def test_nan_out_of_range_and_empty_images_are_refused(processor, bad, message):
    with pytest.raises(ValueError, match=message):
        processor(bad)


def test_transformers_clip_processor_differs(processor):
    """Why we do not use transformers' CLIPImageProcessor as is: measured differences from the original."""
    hf = CLIPImageProcessorPil()

    def max_diff(image):
        ours = processor(image, return_tensors="pt")["pixel_values"]
        theirs = hf(image, return_tensors="pt")["pixel_values"]
        return (ours - theirs).abs().max().item()

    # even crop offsets on RGB: identical
    assert max_diff(random_image(300, 224, "RGB")) < 1e-5
    # long side 227 = 224 + 3: torchvision rounds the offset 1.5 to 2, transformers floors it to 1
    assert max_diff(random_image(227, 224, "RGB")) > 0.1
    # transparency: composited onto white by transformers, dropped after resizing by the original
    assert max_diff(random_image(300, 224, "RGBA")) > 0.1

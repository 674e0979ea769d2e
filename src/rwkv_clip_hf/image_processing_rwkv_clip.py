"""Image processor of RWKV-CLIP: the original evaluation transform (docs/architecture.md §8), pixel for pixel.

The original resizes the shorter side to 224 (bicubic), center-crops 224x224, converts to RGB, scales to
[0, 1] and normalises with the OpenAI CLIP mean and std, using torchvision on PIL images.

transformers' `CLIPImageProcessor` has the same parameters but does not give the same pixels, by measurement
(see `tests/test_image_processing.py::test_transformers_clip_processor_differs`):
  * its center crop rounds the offset down, torchvision rounds it half to even, so images whose long side
    exceeds the crop by 3, 7, 11, ... pixels are cropped one pixel apart (max |diff| ~1 after normalisation);
  * it converts to RGB first and composites transparency onto white, where the original resizes in the
    image's own mode (premultiplied alpha for RGBA, nearest neighbour for palette images, as PIL does) and
    then drops the alpha channel.
So this class keeps transformers' processor machinery (kwargs, saving, Auto classes, batching, tensors) and
replaces only the per-image steps. Differences from the original, deliberate:
  * 16-bit images (PIL "I;16"/"I", uint16 arrays) are scaled to 8-bit range (x / 257) before resizing; the
    original's PIL conversion clips every value above 255 to white.
  * float arrays/tensors (values in [0, 1]) are resized per channel in float (PIL mode "F", the same filter)
    without the 8-bit rounding; uint8 arrays/tensors are handled exactly like PIL images.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ChannelDimension, infer_channel_dimension_format
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
_ARRAY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class RWKVCLIPImageProcessor(CLIPImageProcessorPil):
    """CLIP-style image processor reproducing the original RWKV-CLIP preprocessing exactly.

    Accepts PIL images of any mode (RGB, RGBA, L, LA, P, CMYK, 1, 16-bit, ...), numpy arrays and torch
    tensors (HWC or CHW with 1, 3 or 4 channels, or HW; uint8, uint16 or float in [0, 1]), file paths or
    URLs, single or in lists. Returns `pixel_values` of shape `(batch, 3, crop, crop)`.
    Defaults: `size={"shortest_edge": 224}`, `crop_size=224`, bicubic, OpenAI CLIP mean/std.
    """

    model_input_names = ["pixel_values"]

    def _prepare_images_structure(self, images, expected_ndims: int = 3):
        images = _add_channel_axis_to_2d(images)
        try:
            return super()._prepare_images_structure(images, expected_ndims=expected_ndims)
        except (TypeError, ValueError) as error:
            if "Incorrect image source" in str(error):
                raise  # an unreadable path or URL: transformers' message names it
            raise TypeError(
                "RWKVCLIPImageProcessor: expected an image (PIL image, numpy array, torch tensor, path or URL) or a "
                f"list of images, got {_describe(images)}"
            ) from error

    def process_image(self, image, input_data_format=None, **kwargs):
        """Turn one input into a PIL image in its own mode, or a list of float ("F") channel images."""
        if isinstance(image, PIL.Image.Image):
            image.load()
            if image.width == 0 or image.height == 0:
                raise ValueError(f"RWKVCLIPImageProcessor: empty image ({image.width}x{image.height} PIL image)")
            if image.mode in _SIXTEEN_BIT_MODES:
                return _float_channels(np.asarray(image, dtype=np.float32)[None] / 257.0)
            if image.mode == "F":
                array = np.asarray(image, dtype=np.float32)
                _check_unit_range(array, 'PIL "F" (float) images')
                return _float_channels(array[None] * 255.0)
            return image
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu()
            image = image.float().numpy() if image.dtype == torch.bfloat16 else image.numpy()
        if not isinstance(image, np.ndarray):
            raise TypeError(
                f"RWKVCLIPImageProcessor: expected a PIL image, numpy array, torch tensor, path or URL, got "
                f"{type(image).__name__}"
            )
        return _array_to_pil(image, input_data_format)

    def _preprocess(
        self,
        images,
        do_resize,
        size,
        resample,
        do_center_crop,
        crop_size,
        do_rescale,
        rescale_factor,
        do_normalize,
        image_mean,
        image_std,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        processed = []
        for image in images:
            channels = image if isinstance(image, list) else [image]
            if do_resize:
                channels = [_resize_shortest_edge(c, size, resample) for c in channels]
            if do_center_crop:
                channels = [_center_crop(c, crop_size.height, crop_size.width) for c in channels]
            if isinstance(image, list):  # float channels, already in [0, 255]
                array = np.stack([np.asarray(c, dtype=np.float32) for c in channels])
                array = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array[:3]
            else:
                array = np.asarray(channels[0].convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
            if do_rescale:
                array = _rescale(array, rescale_factor)
            if do_normalize:
                array = self.normalize(array, image_mean, image_std)
            processed.append(np.ascontiguousarray(array, dtype=np.float32))
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)


def _add_channel_axis_to_2d(images):
    # a (H, W) grayscale array is one image, not a batch of H rows: give it a leading channel axis
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 2:
        return images[None]
    if isinstance(images, (list, tuple)):
        return [_add_channel_axis_to_2d(image) if not isinstance(image, (list, tuple)) else image for image in images]
    return images


def _describe(value) -> str:
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(item).__name__ for item in value})
        return f"a {type(value).__name__} of {', '.join(kinds) or 'nothing'}"
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _float_channels(array: np.ndarray) -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32), mode="F") for channel in array]


def _array_to_pil(array: np.ndarray, input_data_format=None):
    if array.ndim == 2:
        array = array[None]
        input_data_format = ChannelDimension.FIRST
    if array.ndim != 3:
        raise ValueError(
            f"RWKVCLIPImageProcessor: an array image must have shape (H, W), (C, H, W) or (H, W, C), got "
            f"{tuple(array.shape)}"
        )
    if input_data_format is None:
        try:
            input_data_format = infer_channel_dimension_format(array, num_channels=(1, 3, 4))
        except ValueError as error:
            raise ValueError(
                f"RWKVCLIPImageProcessor: cannot find the channel axis of an array of shape {tuple(array.shape)} "
                "(expected 1, 3 or 4 channels first or last)"
            ) from error
    if ChannelDimension(input_data_format) == ChannelDimension.LAST:
        array = np.moveaxis(array, -1, 0)
    if array.shape[0] not in _ARRAY_MODES:
        raise ValueError(f"RWKVCLIPImageProcessor: expected 1, 3 or 4 channels, got {array.shape[0]}")
    if array.shape[1] == 0 or array.shape[2] == 0:
        raise ValueError(f"RWKVCLIPImageProcessor: empty image of shape {tuple(array.shape)}")
    if array.dtype == np.uint8:
        pixels = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
        return PIL.Image.fromarray(np.ascontiguousarray(pixels), mode=_ARRAY_MODES[array.shape[0]])
    if array.dtype == np.uint16:
        return _float_channels(array.astype(np.float32) / 257.0)
    if np.issubdtype(array.dtype, np.floating):
        _check_unit_range(array, "float images")
        return _float_channels(array.astype(np.float32) * 255.0)
    raise ValueError(
        f"RWKVCLIPImageProcessor: unsupported array dtype {array.dtype} (use uint8, uint16 or float in [0, 1])"
    )


def _check_unit_range(array: np.ndarray, what: str) -> None:
    """Float pixels must be finite and in [0, 1]: NaN would pass a min/max test and poison the embedding."""
    nan = int(np.isnan(array).sum())
    if nan:
        raise ValueError(f"RWKVCLIPImageProcessor: {what} must not hold NaN, got {nan} NaN value(s) of {array.size}")
    low, high = float(array.min()), float(array.max())
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0.0 or high > 1.0:
        raise ValueError(
            f"RWKVCLIPImageProcessor: {what} must hold values in [0, 1], got range [{low}, {high}]; "
            "pass uint8 pixels or divide by 255"
        )


def _resize_shortest_edge(image: PIL.Image.Image, size, resample) -> PIL.Image.Image:
    """torchvision's Resize(int) on a PIL image: shorter side to `size`, longer side truncated."""
    width, height = image.size
    if size.shortest_edge is not None:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size.shortest_edge, int(size.shortest_edge * long / short)
        new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        new_size = (size.width, size.height)
    if new_size == (width, height):
        return image
    return image.resize(new_size, resample=PIL.Image.Resampling(int(resample)))


def _crop_offset(length: int, crop: int) -> int:
    # torchvision pads a too-small image symmetrically (extra pixel after), else rounds half to even
    return -((crop - length) // 2) if length < crop else int(round((length - crop) / 2.0))


def _center_crop(image: PIL.Image.Image, crop_height: int, crop_width: int) -> PIL.Image.Image:
    width, height = image.size
    if (width, height) == (crop_width, crop_height):
        return image
    left, top = _crop_offset(width, crop_width), _crop_offset(height, crop_height)
    return image.crop((left, top, left + crop_width, top + crop_height))  # outside the image: zeros


def _rescale(array: np.ndarray, factor: float) -> np.ndarray:
    # torchvision's ToTensor divides by 255 in float32; multiplying by float(1/255) can differ in the last bit
    divisor = 1.0 / factor
    if abs(divisor - round(divisor)) < 1e-6:
        return array / np.float32(round(divisor))
    return array * np.float32(factor)


# saving writes this module and the `auto_map` entry next to the files (remote code, see remote_code_rwkv_clip)
RWKVCLIPImageProcessor.register_for_auto_class()

__all__ = ["RWKVCLIPImageProcessor"]

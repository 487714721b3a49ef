"""Images to VAE input: RGB, [-1, 1], a size the reward model accepts.

The reference scores an image from disk as `ToTensor()` then `Normalize(0.5, 0.5)`: RGB in
[-1, 1] at its own size. SD3's VAE downsamples by 8 and the transformer patches 2x2 latents, so
the pixel height and width must be multiples of 16; the reference leaves that to the user (any
other size fails inside its patch embedding). Here the size is handled explicitly, by policy:

* "crop" (default): center-crop to the largest multiple of 16 in each direction (at most 15
  pixels lost per side pair; nothing is distorted);
* "resize": resize to the nearest multiple of 16 in each direction (bicubic; the aspect ratio
  changes by at most 8 pixels' worth);
* "bucket": resize to the nearest multiple of 64 in each direction (bicubic; at most 32 pixels'
  worth of aspect change per side): images of nearby sizes share one size, so a run over many
  sizes compiles one graph per bucket instead of one per size, at the price of a resize;
* "error": refuse any other size.

Images of different sizes are never squeezed into one shape: `group_by_size` batches them by
size and the caller encodes each group on its own. `fitted_size` says, from a file's header,
which size an image will have (what score runs batch by).

Accepted images: PIL images (any mode, converted to RGB), uint8 arrays (H, W, 3), float arrays
in [0, 1] as (H, W, 3) or (3, H, W), and batches of those as numpy (B, H, W, 3) or a
MindSpore / numpy (B, 3, H, W) in [0, 1] (the Flow-GRPO-MS scorer contract).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ..core.errors import InputError, MissingDependencyError
from ..core.resize import center_crop_start, shortest_edge_size

MULTIPLE = 16                       # VAE downsampling 8 x transformer patch 2
BUCKET = 64                         # the grid of the "bucket" size policy
SIZE_POLICIES = ("crop", "resize", "bucket", "error")


def pil_image_module():
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError("reading images needs Pillow: pip install pillow") from None
    return Image


def load_image(path: str):
    """A PIL image from a file, with an error that names the file when it cannot be read."""
    Image = pil_image_module()
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found") from None
    except (OSError, ValueError, SyntaxError) as e:      # PIL's errors for unreadable or truncated files
        raise InputError(f"{path}: cannot read the image ({e})") from None


def image_size(path: str) -> Tuple[int, int]:
    """(width, height) of an image file, from its header (the pixels are not read)."""
    Image = pil_image_module()
    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise InputError(f"{path}: image file not found") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{path}: cannot read the image ({e})") from None


def split_batch(images: Any) -> List[Any]:
    """A list of single images from a list, or from a batch array / tensor (B, ...)."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if hasattr(images, "asnumpy"):                        # a MindSpore tensor (B, 3, H, W)
        images = images.asnumpy()
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    raise InputError(f"images must be a list of images or a batch array (B, H, W, 3) / (B, 3, H, W), "
                     f"got {type(images).__name__}{getattr(images, 'shape', '')}")


def to_unit_rgb(image: Any, index: int = 0) -> np.ndarray:
    """One image as float32 (3, H, W) in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size"):          # PIL
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    elif hasattr(image, "asnumpy"):
        array = image.asnumpy()
    else:
        array = np.asarray(image)
    if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
        raise InputError(f"images[{index}] must be (H, W, 3) or (3, H, W), got shape {array.shape}")
    if array.shape[-1] == 3 and array.shape[0] != 3:
        array = array.transpose(2, 0, 1)                               # (H, W, 3) -> (3, H, W)
    elif array.shape[0] == 3 and array.shape[-1] == 3:
        raise InputError(f"images[{index}] has shape {array.shape}: ambiguous layout; pass (3, H, W) "
                         "arrays of images larger than 3 pixels")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype.kind != "f" and str(array.dtype) != "bfloat16":
        raise InputError(f"images[{index}] must be uint8 or float in [0, 1], got dtype {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"images[{index}] contains NaN or Inf")
    if array.min() < -1e-3 or array.max() > 1 + 1e-3:
        raise InputError(f"images[{index}]: float images must lie in [0, 1], got values in "
                         f"[{array.min():.3g}, {array.max():.3g}]")
    return np.clip(array, 0.0, 1.0)


def fitted_size(height: int, width: int, policy: str = "crop", multiple: int = MULTIPLE) -> Tuple[int, int]:
    """(H', W'): the size an image of height x width pixels takes under a size policy."""
    if policy not in SIZE_POLICIES:
        raise InputError(f"size policy must be one of {SIZE_POLICIES}, got {policy!r}")
    if policy == "crop":
        return height - height % multiple, width - width % multiple
    if policy in ("resize", "bucket"):
        grid = multiple if policy == "resize" else BUCKET
        return tuple(max(grid, int(round(n / grid)) * grid) for n in (height, width))
    return height, width


def fit_size(array: np.ndarray, policy: str = "crop", multiple: int = MULTIPLE, index: int = 0) -> np.ndarray:
    """(3, H, W) -> (3, H', W') with H', W' multiples of `multiple`, by the size policy."""
    _, height, width = array.shape
    new_h, new_w = fitted_size(height, width, policy, multiple)
    if (new_h, new_w) == (height, width) and height % multiple == 0 and width % multiple == 0:
        return array
    if policy == "error":
        raise InputError(f"images[{index}] is {height}x{width} pixels; the reward model needs multiples of "
                         f"{multiple}: crop or resize it, or use size policy 'crop' / 'resize'")
    if policy == "crop":
        if not new_h or not new_w:
            raise InputError(f"images[{index}] is {height}x{width} pixels: smaller than {multiple} pixels")
        top, left = (height - new_h) // 2, (width - new_w) // 2
        return array[:, top:top + new_h, left:left + new_w]
    Image = pil_image_module()
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(c, dtype=np.float32)).resize((new_w, new_h),
                                                                                          Image.BICUBIC))
                for c in array]                                          # one float ("F") image per channel
    return np.clip(np.stack(channels), 0.0, 1.0)


def preprocess(images: Any, policy: str = "crop", multiple: int = MULTIPLE) -> List[np.ndarray]:
    """Images -> a list of float32 (3, H, W) arrays in [-1, 1], sizes fitted by `policy`."""
    items = split_batch(images)
    if not items:
        raise InputError("images is empty")
    return [fit_size(to_unit_rgb(image, i), policy, multiple, i) * 2.0 - 1.0 for i, image in enumerate(items)]


def group_by_size(pixels: Sequence[np.ndarray]) -> Dict[Tuple[int, int], List[int]]:
    """{(H, W): indices of the images of that size}, in order of first appearance."""
    groups: Dict[Tuple[int, int], List[int]] = OrderedDict()
    for i, array in enumerate(pixels):
        groups.setdefault(tuple(array.shape[1:]), []).append(i)
    return groups


def resize_center_crop(image: Any, size: int, index: int = 0) -> np.ndarray:
    """One image as float32 (3, size, size) in [0, 1] the way ImageReward's preprocessing treats a
    PIL image (torchvision's Resize(size, bicubic), CenterCrop(size), then convert("RGB"), ToTensor):
    PIL's bicubic resize of the shorter side to `size` (the longer one to int(size * long / short))
    in the image's own mode (PIL resizes RGBA / LA premultiplied and P / 1 images by nearest), the
    centre crop at int(round((length - size) / 2)), and only then RGB. Arrays in [0, 1] are first
    rounded to uint8, as a trainer's images are before such a scorer sees them."""

    Image = pil_image_module()
    if not (hasattr(image, "convert") and hasattr(image, "size")):
        unit = to_unit_rgb(image, index)                                    # (3, H, W) in [0, 1]
        image = Image.fromarray(np.round(unit.transpose(1, 2, 0) * 255.0).astype(np.uint8))
    width, height = image.size
    new_h, new_w = shortest_edge_size(height, width, size)
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = center_crop_start(new_h, size, "round"), center_crop_start(new_w, size, "round")   # torchvision's
    cropped = resized.crop((left, top, left + size, top + size)).convert("RGB")
    return np.asarray(cropped, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / 255.0

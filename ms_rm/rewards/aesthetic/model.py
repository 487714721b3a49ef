"""The LAION improved aesthetic predictor in MindSpore: CLIP image features, L2-normalised, into an MLP.

    score = MLP(f / ||f||),  f = visual_projection(post_layernorm(ViT(pixels))[class token])

The tower is transformers' CLIPVisionModelWithProjection (ms_rm.rewards.clip's vision classes,
the same parameter names: `vision_model.*`, `visual_projection.weight`); the MLP is the
predictor's nn.Sequential of Linear layers without activations (its Dropouts inactive at
inference), so its parameters are `mlp.layers.0`, `.2`, `.4`, `.6`, `.7` for the released widths
768 -> 1024 -> 128 -> 64 -> 16 -> 1. Computed in float32 (Flow-GRPO-MS's scorer runs bf16 by
default; ImageReward's AestheticScore fp32 on the CPU, fp16 on a GPU).

Two inputs:
* `reward(pixel_values)`: preprocessed pixel values (B, 3, S, S), CLIPImageProcessor's or
  ImageReward's (ms_rm.scoring.aesthetic makes either);
* `forward_pixels(pixels, rows, cols_t, mean, std)` (from `prepare_pixels`): pixels (B, 3, H, W) in
  [0, 1], the resize-and-crop as two matrix products and the normalisation inside the program,
  differentiable with respect to the pixels (ReFL, search).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint

from ...core.compiled import CompiledCell
from ...core.errors import ConfigError, InputError
from ...core.inputs import as_float_tensor, check_finite, pixel_batch
from ...core.layers import Linear
from ...core.weights import load_parameters
from ...io.converted import ConvertedFolder
from ..clip.model import CLIPVisionTransformer
from ..clip.preprocess import pixel_values, resize_matrices
from ..imagereward.model import MLP
from . import conversion
from .config import FORMAT_NAME, AestheticConfig

MATRIX_CACHE = 8                  # input sizes whose resize matrices are kept


def _normalize(x: Tensor) -> Tensor:
    """x / ||x||_2 over the last axis (Flow-GRPO-MS's division; ImageReward's F.normalize differs
    only for a zero vector)."""
    return x / mint.sqrt(mint.sum(x * x, dim=-1, keepdim=True))


class Aesthetic(CompiledCell):
    """Build it with `Aesthetic.from_pretrained(dir)` (a folder `ms-rm convert --reward aesthetic`
    wrote) or `Aesthetic(config)` then `load_state_dict` / `randomize`."""

    name = "aesthetic"                # the RewardModel protocol (ms_rm.rewards.base)
    input_kind = "pixels"
    format_name = FORMAT_NAME

    def __init__(self, config: AestheticConfig, mode: str = "graph"):
        super().__init__(mode)
        self.config = config
        with self.parameters_in(ms.float32):
            self.vision_model = CLIPVisionTransformer(config.clip)
            self.visual_projection = Linear(config.clip.vision.tower.hidden_size, config.clip.projection_dim,
                                            bias=False)
            self.mlp = MLP(config.in_width, tuple(config.mlp_widths))
        self._matrices: Dict[Tuple[int, int], Tuple[Tensor, ...]] = {}

    # --- the RewardModel protocol ------------------------------------------------------------------
    @classmethod
    def parameter_shapes(cls, config: AestheticConfig) -> Dict[str, Tuple[int, ...]]:
        return {p.name: tuple(p.shape) for p in cls(config).get_parameters()}

    @classmethod
    def from_pretrained(cls, path: str, dtype: ms.Type = ms.float32, mode: str = "graph",
                        verify: bool = False) -> "Aesthetic":
        """A folder written by `ms-rm convert --reward aesthetic`, every parameter filled strictly."""
        if dtype != ms.float32:
            raise ConfigError(f"the aesthetic predictor computes in float32 only, not {dtype}")
        with ConvertedFolder(path, verify=verify) as folder:
            folder.expect_format(FORMAT_NAME)
            model = cls(AestheticConfig.from_dict(folder.config, folder.config_path), mode=mode)
            load_parameters(model, folder.read, folder.names, folder.weights_path)
        return model

    @classmethod
    def convert(cls, pth: str, clip: str, out: str, image_processor: str = None, dtype: str = "keep",
                force: bool = False, progress: bool = True) -> str:
        """The predictor's `.pth` (sac+logos+ava1-l14-linearMSE.pth, an MLP state dict) and a
        transformers CLIPModel folder (openai/clip-vit-large-patch14: config.json, model.safetensors,
        preprocessor_config.json; `image_processor`: a folder of its own holding the latter) -> a
        converted folder `out`."""
        return conversion.convert(pth, clip, out, cls.parameter_shapes, image_processor=image_processor,
                                  dtype=dtype, force=force, progress=progress)

    # --- the tensor program ------------------------------------------------------------------------
    def construct(self, pixel_values: Tensor):
        """Normalised pixel values (B, 3, S, S) -> (image features (B, P), unit features, score (B, 1))."""
        features = self.visual_projection(self.vision_model(pixel_values))
        unit = _normalize(features)
        return features, unit, self.mlp(unit)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """The score (B, 1) of `prepare`'s tensor: pure, differentiable."""
        return self.construct(pixel_values)[-1]

    def transform(self, pixels: Tensor, rows: Tensor, cols_t: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) in [0, 1] -> resized, center-cropped, normalised (B, 3, S, S)."""
        b, c, h, w = pixels.shape
        s_h, s_w = rows.shape[0], cols_t.shape[1]
        x = mint.matmul(pixels.reshape(b * c * h, w), cols_t).reshape(b * c, h, s_w)
        x = mint.matmul(rows, x).reshape(b, c, s_h, s_w)
        return (x - mean.reshape(1, c, 1, 1)) / std.reshape(1, c, 1, 1)

    def forward_pixels(self, pixels: Tensor, rows: Tensor, cols_t: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """The score (B, 1) of `prepare_pixels`' tensors: pure, differentiable with respect to the pixels."""
        return self.forward(self.transform(pixels, rows, cols_t, mean, std))

    # --- host side ---------------------------------------------------------------------------------
    def prepare(self, pixel_values) -> Tuple[Tensor]:
        """Preprocessed pixel values (B, 3, S, S), checked: `forward`'s tensor."""
        size = self.config.clip.vision.image_size
        x = as_float_tensor(pixel_values, "pixel_values")
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size) or x.shape[0] == 0:
            raise InputError(f"pixel_values must be (B, 3, {size}, {size}) (preprocessed images), got "
                             f"{tuple(x.shape)}")
        check_finite(x, "pixel_values")
        return (x.astype(ms.float32),)

    def prepare_pixels(self, pixels) -> Tuple[Tensor, ...]:
        """Pixels (B, 3, H, W) in [0, 1] (a tensor, which keeps its gradient), checked, with the
        resize matrices of CLIPImageProcessor's size and crop and its mean / std: `forward_pixels`'
        tensors. `pixels` may be only the images' shape (B, 3, H, W), for a trainer that makes the
        images inside its loss (ReFL: `forward_pixels(decoded, *prepare_pixels(shape)[1:])`): the
        first tensor is then None."""
        if isinstance(pixels, tuple) and all(isinstance(v, int) for v in pixels):
            if len(pixels) != 4 or pixels[1] != 3 or min(pixels) < 1:
                raise InputError(f"pixels' shape must be (B, 3, H, W), got {pixels}")
            return (None,) + self.resize_tensors(pixels[2], pixels[3])
        x = pixel_batch(pixels)
        return (x.astype(ms.float32),) + self.resize_tensors(x.shape[2], x.shape[3])

    def resize_tensors(self, height: int, width: int) -> Tuple[Tensor, ...]:
        """(rows, cols_t, mean, std) of the differentiable preprocessing of (H, W) pixels."""
        key = (int(height), int(width))
        if key not in self._matrices:
            if len(self._matrices) >= MATRIX_CACHE:
                self._matrices.pop(next(iter(self._matrices)))
            processing = self.config.processing
            rows, cols_t = resize_matrices(key[0], key[1], processing)
            self._matrices[key] = (Tensor(rows), Tensor(cols_t), Tensor(np.float32(processing.mean)),
                                   Tensor(np.float32(processing.std)))
        return self._matrices[key]

    def stages(self, pixel_values) -> Dict[str, Tensor]:
        """{"image_features", "unit_features", "score"} of preprocessed pixel values."""
        parts = self.run("construct", *self.prepare(pixel_values))
        return dict(zip(("image_features", "unit_features", "score"), parts))

    def reward(self, pixel_values, prompts: Any = None) -> Tensor:
        """(B, 1) scores of preprocessed pixel values; `forward(*prepare(...))`, compiled in graph mode.
        The predictor reads no prompt (`prompts` is accepted and ignored)."""
        return self.run("forward", *self.prepare(pixel_values))

    def reward_of_pixels(self, pixels) -> Tensor:
        """(B, 1) scores of pixels (B, 3, H, W) in [0, 1], differentiable with respect to them."""
        return self.run("forward_pixels", *self.prepare_pixels(pixels))

    def score(self, images, prompts: Any = None) -> List[float]:
        """One float per image, without gradient: preprocessed pixel values (B, 3, S, S) float, or
        PIL images / uint8 (H, W, 3) arrays (a list, or a (K, H, W, 3) uint8 batch as ms_rm.search's
        GenerateAndScore passes a pixel reward), preprocessed as CLIPImageProcessor (Flow-GRPO-MS's
        CLIPProcessor) does. The predictor reads no prompt (`prompts` is ignored)."""
        if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3:
            images = list(images)                     # (K, H, W, 3) uint8: what a noise search decodes
        if isinstance(images, (list, tuple)):
            processing = self.config.processing
            images = pixel_values([_uint8_rgb(image, i, processing.do_convert_rgb) for i, image in enumerate(images)],
                                  processing)
        return [float(v) for v in self.reward(images).asnumpy()[:, 0]]


def _uint8_rgb(image: Any, index: int, convert_rgb: bool = True) -> np.ndarray:
    """A PIL image (converted to RGB, as CLIPImageProcessor's do_convert_rgb) or a uint8 (H, W, 3) array."""
    if hasattr(image, "convert") and hasattr(image, "size"):
        if image.mode != "RGB" and not convert_rgb:
            raise InputError(f"images[{index}] is a {image.mode} image and the preprocessor config sets "
                             "do_convert_rgb=false: convert it to RGB first")
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise InputError(f"images[{index}] must be a PIL image or a uint8 (H, W, 3) array here, got "
                         f"{array.dtype} {array.shape} (float images: ms_rm.scoring.aesthetic.AestheticScorer)")
    return array

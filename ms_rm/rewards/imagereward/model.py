"""ImageReward (THUDM): BLIP's ViT and text encoder, and an MLP on the prompt's [CLS] output.

    image features = ViT(normalised pixels)                      (B, N, E)
    text = BERT(prompt tokens, attending to the image features)  (B, L, D)
    reward = (MLP(text[:, 0]) - mean) / std                      (B, 1)

as the package's `ImageReward.score_gard` computes it. Calls:

* `reward(pixels, input_ids, attention_mask)`: pixels already preprocessed (B, 3, S, S);
* `reward_of_pixels(pixels, input_ids, attention_mask)`: pixels (B, 3, H, W) in [0, 1], e.g. a
  decoded image, through the ReFL transform (resize, center crop, normalise: see `_resize`),
  differentiable with respect to the pixels;
* `stages(...)`: image features, [CLS] feature and reward by name, for parity checks.

Each call is `forward(*prepare(...))` (preprocessed pixels) or `forward_pixels(*prepare_pixels(...))`
(pixels in [0, 1]): `prepare*` checks the inputs once and builds the host tensors (token tensors,
resize-and-crop matrices); `forward*` is the pure tensor program, composable under ms.jit and
ms.value_and_grad (the pixel ReFL calls `forward_pixels` inside its loss).

Prompts become tokens with `ImageRewardTokenizer` (tokenizer.py); images from files or PIL
become pixels with ms_rm.scoring.imagereward, which also offers score / inference_rank.
The tensor part runs compiled ("graph") or eagerly ("pynative"), with the same numbers.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Dict, List, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn

from ...core import ops
from ...core.compile_cache import jit
from ...core.compiled import CompiledCell
from ...core.errors import InputError
from ...core.inputs import as_float_tensor, check_finite
from ...core.layers import Linear
from ...core.weights import load_parameters
from ...io.converted import ConvertedFolder
from . import conversion
from .bert import TextEncoder
from .config import FORMAT_NAME, PIXEL_MEAN, PIXEL_STD, ImageRewardConfig
from ...core.resize import resize_crop_matrices
from .vit import VisionTransformer

logger = logging.getLogger(__name__)

MATRIX_CACHE = 8                  # input sizes whose resize matrices are kept (least recently used out)


class MLP(nn.Cell):
    """Linear layers only (the package's activations are commented out; its dropouts are inactive),
    indexed as the package's nn.Sequential: layers.0, .2, .4, .6, .7 for the released widths."""

    def __init__(self, in_width: int, widths: Tuple[int, ...]):
        super().__init__()
        cells, last = [], in_width
        for i, width in enumerate(widths + (1,)):
            cells.append(Linear(last, width))
            if i < len(widths) - 1:
                cells.append(nn.Identity())             # the package's Dropout, so the indices match
            last = width
        self.layers = nn.SequentialCell(cells)

    def construct(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ImageReward(CompiledCell):
    """Build it with `ImageReward.from_pretrained(dir)` (a converted folder) or
    `ImageReward(config)` then `load_state_dict` / `randomize`."""

    name = "imagereward"              # the RewardModel protocol (ms_rm.rewards.base)
    input_kind = "pixels"
    format_name = FORMAT_NAME
    config_class = ImageRewardConfig           # what from_pretrained reads; a subclass (BLIPScore) names its own
    conversion = conversion                    # the module whose convert() writes its folders

    def __init__(self, config: ImageRewardConfig = ImageRewardConfig(), dtype: ms.Type = ms.float32,
                 mode: str = "graph"):
        super().__init__(mode)
        self.config = config
        with self.parameters_in(dtype):
            self.visual_encoder = VisionTransformer(config.vision)
            self.text_encoder = TextEncoder(config.text, config.vision.width)
            self.mlp = MLP(config.text.width, tuple(config.mlp_widths))
        self._init_transform()

    def _init_transform(self) -> None:
        """The ReFL transform's constants and its matrix cache (shared with the BLIP score)."""
        self.pixel_mean = Tensor(np.asarray(PIXEL_MEAN, np.float32).reshape(1, 3, 1, 1))
        self.pixel_std = Tensor(np.asarray(PIXEL_STD, np.float32).reshape(1, 3, 1, 1))
        self._matrices: "OrderedDict[Tuple[int, int, bool], Tuple[Tensor, Tensor]]" = OrderedDict()

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: ms.Type = ms.float32, mode: str = "graph",
                        verify: bool = False) -> "ImageReward":
        """Load a folder written by `ms-rm convert-imagereward` (`convert --reward` of the class), every
        parameter filled strictly."""
        with ConvertedFolder(path, verify=verify) as folder:
            folder.expect_format(cls.format_name)
            model = cls(cls.config_class.from_dict(folder.config, folder.config_path), dtype=dtype, mode=mode)
            load_parameters(model, folder.read, folder.names, folder.weights_path)
        return model

    @classmethod
    def convert(cls, src: str, out: str, dtype: str = "keep", force: bool = False, progress: bool = True,
                config: Any = None) -> str:
        """The released checkpoint (ImageReward.pt, a torch state dict; BLIPScore: model_large.pth) -> a
        converted folder `out`."""
        return cls.conversion.convert(src, out, cls.parameter_shapes, config=config, dtype=dtype, force=force,
                                  progress=progress)

    # --- the tensor program ------------------------------------------------------------------
    def construct(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor):
        """Normalised pixels (B, 3, S, S), tokens (B, L) -> image features (B, N, E), [CLS] (B, D), reward (B, 1)."""
        image = self.visual_encoder(pixels.astype(self.compute_dtype))
        text = self.text_encoder(input_ids, attention_mask, image)                    # (B, L, D)
        cls = text[:, 0]
        raw = self.mlp(cls).astype(ms.float32)
        return image, cls, (raw - self.config.reward_mean) / self.config.reward_std

    def transform(self, pixels: Tensor, rows: Tensor, cols_t: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) in [0, 1] -> resized, center-cropped, normalised (B, 3, S, S)."""
        b, c, h, w = pixels.shape
        s = rows.shape[0]
        x = mint.matmul(ops.broadcast_to_shape(rows, (b, c, s, h)), pixels)           # (B, 3, S, W)
        x = mint.matmul(x, ops.broadcast_to_shape(cols_t, (b, c, w, s)))              # (B, 3, S, S)
        return (x - ops.expand(self.pixel_mean, x)) / ops.expand(self.pixel_std, x)

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The reward (B, 1) of `prepare`'s tensors: pure, differentiable."""
        return self.construct(pixels, input_ids, attention_mask)[-1]

    def forward_pixels(self, pixels: Tensor, rows: Tensor, cols_t: Tensor, input_ids: Tensor,
                       attention_mask: Tensor) -> Tensor:
        """The reward (B, 1) of `prepare_pixels`' tensors, pixels in [0, 1] through the ReFL transform:
        pure, differentiable with respect to the pixels."""
        return self.forward(self.transform(pixels, rows, cols_t), input_ids, attention_mask)

    # --- host-side preparation: the public `prepare` / `prepare_pixels` ---------------------------
    def prepare(self, pixels, input_ids, attention_mask) -> Tuple[Tensor, Tensor, Tensor]:
        """Preprocessed pixels (B, 3, S, S) and prompt tokens (B, L), checked: `forward`'s tensors."""
        x = self._pixels(pixels)
        return (x,) + self._tokens(input_ids, attention_mask, x.shape[0])

    def prepare_pixels(self, pixels, input_ids, attention_mask, antialias: bool = True) -> Tuple:
        """Pixels (B, 3, H, W) in [0, 1] and prompt tokens (B, L), checked, with the ReFL transform's
        resize-and-crop matrices (`_resize`): `forward_pixels`' tensors. `pixels` may be only the
        images' shape (B, 3, H, W), for a trainer that makes the images inside its loss: the first
        tensor is then None."""
        if isinstance(pixels, tuple) and all(isinstance(v, int) for v in pixels):
            if len(pixels) != 4 or pixels[1] != 3:
                raise InputError(f"pixels' shape must be (B, 3, H, W), got {pixels}")
            x, shape = None, pixels
        else:
            x = self._pixels(pixels, size=False)
            shape = tuple(x.shape)
        rows, cols_t = self._resize(shape[2], shape[3], antialias)
        return (x, rows, cols_t) + self._tokens(input_ids, attention_mask, shape[0])

    # --- host-side checks -----------------------------------------------------------------------
    def _tokens(self, input_ids, attention_mask, batch: int) -> Tuple[Tensor, Tensor]:
        ids = np.asarray(input_ids.asnumpy() if hasattr(input_ids, "asnumpy") else input_ids)
        mask = np.asarray(attention_mask.asnumpy() if hasattr(attention_mask, "asnumpy") else attention_mask)
        if ids.ndim != 2 or ids.shape[0] != batch or ids.shape[1] < 1:
            raise InputError(f"input_ids must be (B={batch}, L) token ids, got shape {ids.shape}")
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask must have input_ids' shape {ids.shape}, got {mask.shape}")
        if ids.shape[1] > self.config.text.max_positions:
            raise InputError(f"input_ids has {ids.shape[1]} tokens; the model has "
                             f"{self.config.text.max_positions} positions")
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= self.config.text.vocab_size:
            raise InputError(f"input_ids must be integer ids in 0..{self.config.text.vocab_size - 1}")
        return Tensor(ids.astype(np.int32)), Tensor(mask.astype(np.float32))

    def _pixels(self, pixels: Any, name: str = "pixels", size: bool = True) -> Tensor:
        x = as_float_tensor(pixels, name)
        s = self.config.vision.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] < 1 or (size and tuple(x.shape[2:]) != (s, s)):
            want = f"(B, 3, {s}, {s}) (preprocessed)" if size else "(B, 3, H, W) in [0, 1]"
            raise InputError(f"{name} must be {want}, got shape {tuple(x.shape)}")
        check_finite(x, name)
        return x

    def _resize(self, height: int, width: int, antialias: bool) -> Tuple[Tensor, Tensor]:
        """The ReFL transform's Resize(224, bicubic) + CenterCrop(224) of (H, W) float pixels as two
        matrices (ms_rm.core.resize): torchvision resizes float tensors with torch's interpolate
        (antialias=True by default since torchvision 0.17; False, the older default) and crops at
        int(round(excess / 2))."""
        key = (height, width, antialias)
        if key not in self._matrices:
            size = self.config.vision.image_size
            rows, cols = resize_crop_matrices(height, width, size, (size, size), "round", antialias)  # torchvision's crop
            self._matrices[key] = (Tensor(rows), Tensor(np.ascontiguousarray(cols.T)))
            if len(self._matrices) > MATRIX_CACHE:
                self._matrices.popitem(last=False)
        self._matrices.move_to_end(key)
        return self._matrices[key]

    # --- public calls ------------------------------------------------------------------------
    def stages(self, pixels, input_ids, attention_mask) -> Dict[str, Tensor]:
        """image_features, text_features ([CLS]) and reward of preprocessed pixels, by name."""
        image, cls, reward = self.run("construct", *self.prepare(pixels, input_ids, attention_mask))
        return {"image_features": image, "text_features": cls, "reward": reward}

    def reward(self, pixels, input_ids, attention_mask) -> Tensor:
        """Rewards (B, 1) of preprocessed pixels (B, 3, S, S) and prompt tokens (B, L)."""
        return self.run("forward", *self.prepare(pixels, input_ids, attention_mask))

    def reward_of_pixels(self, pixels, input_ids, attention_mask, antialias: bool = True) -> Tensor:
        """Rewards (B, 1) of images (B, 3, H, W) in [0, 1] through the ReFL transform (`_resize`)."""
        return self.run("forward_pixels", *self.prepare_pixels(pixels, input_ids, attention_mask, antialias))

    def reward_and_pixel_grad(self, pixels, input_ids, attention_mask, antialias: bool = True):
        """(rewards (B, 1), d sum(rewards) / d pixels (B, 3, H, W)) of images in [0, 1]."""

        def total(p, r, c, i, m):
            reward = self.forward_pixels(p, r, c, i, m)
            return reward.sum(), reward

        grad_fn = ms.value_and_grad(total, grad_position=0, has_aux=True)
        if self.mode == "graph":
            grad_fn = jit(grad_fn, self, name="pixel_reward_and_grad")
        (_, reward), grad = grad_fn(*self.prepare_pixels(pixels, input_ids, attention_mask, antialias))
        return reward, grad

    def score(self, pixels, input_ids, attention_mask) -> List[float]:
        """One float per sample, of preprocessed pixels, without gradient."""
        return [float(v) for v in self.reward(pixels, input_ids, attention_mask).asnumpy()[:, 0]]

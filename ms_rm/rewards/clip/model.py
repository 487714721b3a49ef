"""CLIP's text and vision towers in MindSpore, as transformers' `CLIPModel` computes them.

Attribute names follow transformers' modules, so parameter names are the checkpoint's tensor
names (`vision_model.pre_layrnorm.weight`, `text_model.encoder.layers.0.self_attn.q_proj.bias`,
`visual_projection.weight`, `logit_scale`, ...) and loading maps nothing.

* Vision: patch embedding (stride-p convolution without bias, computed as patchify + matmul:
  exact, and it runs on every backend), the class token prepended, position embeddings, the
  pre-LayerNorm ("pre_layrnorm", transformers' spelling), pre-norm encoder layers, the class
  token's output through post_layernorm, then visual_projection.
* Text: token + position embeddings, pre-norm encoder layers under a causal mask,
  final_layer_norm, the hidden state of the pooled token (see `pooled_token_index`), then
  text_projection.
* Similarity: both embeddings divided by their L2 norms; the cosine, and logits =
  exp(logit_scale) x cosine.

Shapes: B batch, L tokens (77), N = 1 + patches, D tower width, P projection_dim.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn
from mindspore.common.initializer import initializer

from ...core import ops
from ...core.compiled import CompiledCell
from ...core.errors import ConfigError, InputError
from ...core.layers import LayerNorm, Linear
from ...io.files import read_json
from .config import CONFIG_FILE, LEGACY_EOS_TOKEN_ID, CLIPConfig, TowerConfig

FORMAT_NAME = "ms_rm.clip"


class Weight(nn.Cell):
    """A module that only holds a `weight`: torch.nn.Embedding (rows, D), or the bias-free
    patch-embedding convolution (D, 3, p, p)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = Parameter(initializer("zeros", shape, ms.float32), name="weight")


class CLIPAttention(nn.Cell):
    def __init__(self, config: TowerConfig):
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(d, d) for _ in range(4))

    def construct(self, x: Tensor, bias=None) -> Tensor:
        q, k, v = (ops.split_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(ops.merge_heads(ops.attention(q, k, v, bias)))        # (B, L, D)


class CLIPMLP(nn.Cell):
    def __init__(self, config: TowerConfig):
        super().__init__()
        self.activation = config.activation
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def construct(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        if self.activation == "quick_gelu":
            x = ops.quick_gelu(x)
        else:
            x = ops.gelu(x, approximate=self.activation == "gelu_tanh")
        return self.fc2(x)


class CLIPEncoderLayer(nn.Cell):
    """x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, config: TowerConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def construct(self, x: Tensor, bias=None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Cell):
    def __init__(self, config: TowerConfig):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def construct(self, x: Tensor, bias=None) -> Tensor:
        for layer in self.layers:
            x = layer(x, bias)
        return x


class CLIPVisionEmbeddings(nn.Cell):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        vision, d = config.vision, config.vision.tower.hidden_size
        self.patch = vision.patch_size
        self.class_embedding = Parameter(initializer("zeros", (d,), ms.float32), name="class_embedding")
        self.patch_embedding = Weight(d, vision.num_channels, self.patch, self.patch)
        self.position_embedding = Weight(vision.num_patches + 1, d)

    def construct(self, pixel_values: Tensor) -> Tensor:
        weight = self.patch_embedding.weight
        patches = ops.patchify(pixel_values, self.patch)                          # (B, N-1, 3*p*p)
        embeds = ops.linear(patches, weight.reshape(weight.shape[0], -1))         # (B, N-1, D)
        cls = ops.expand(self.class_embedding.reshape(1, 1, -1), embeds[:, :1])  # (B, 1, D)
        embeds = mint.cat([cls, embeds], dim=1)                                   # (B, N, D)
        return embeds + ops.expand(self.position_embedding.weight[None], embeds)


class CLIPVisionTransformer(nn.Cell):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        tower = config.vision.tower
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = LayerNorm(tower.hidden_size, tower.layer_norm_eps)
        self.encoder = CLIPEncoder(tower)
        self.post_layernorm = LayerNorm(tower.hidden_size, tower.layer_norm_eps)

    def construct(self, pixel_values: Tensor) -> Tensor:
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))       # (B, N, D)
        return self.post_layernorm(x[:, 0])                                      # (B, D): the class token


class CLIPTextEmbeddings(nn.Cell):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        text, d = config.text, config.text.tower.hidden_size
        self.token_embedding = Weight(text.vocab_size, d)
        self.position_embedding = Weight(text.max_position_embeddings, d)

    def construct(self, input_ids: Tensor) -> Tensor:
        embeds = ops.embedding(self.token_embedding.weight, input_ids)           # (B, L, D)
        positions = self.position_embedding.weight[: input_ids.shape[1]][None]  # (1, L, D)
        return embeds + ops.expand(positions, embeds)


class CLIPTextTransformer(nn.Cell):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        tower = config.text.tower
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(tower)
        self.final_layer_norm = LayerNorm(tower.hidden_size, tower.layer_norm_eps)

    def construct(self, input_ids: Tensor, pooled_one_hot: Tensor, causal_bias: Tensor) -> Tensor:
        x = self.final_layer_norm(self.encoder(self.embeddings(input_ids), causal_bias))   # (B, L, D)
        # The pooled token's row, as a product with its one-hot row (exact: one 1, zeros elsewhere).
        return mint.matmul(pooled_one_hot[:, None], x)[:, 0]                     # (B, D)


def pooled_token_index(input_ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """The token whose hidden state the text tower pools, per row (transformers 4.57): the
    position of the highest id when the config's eos_token_id is the legacy 2, else the first
    position of eos_token_id (0 when a row has none, as torch's argmax of all-false)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return input_ids.argmax(axis=-1)
    return (input_ids == eos_token_id).argmax(axis=-1)


def causal_bias(length: int) -> np.ndarray:
    """(1, 1, L, L): 0 on and below the diagonal, float32's lowest value above it (the additive
    causal mask transformers builds)."""
    upper = np.triu(np.ones((length, length), dtype=bool), k=1)
    return np.where(upper, np.finfo(np.float32).min, 0.0).astype(np.float32)[None, None]


def _normalize(x: Tensor) -> Tensor:
    """x / ||x||_2 over the last axis."""
    return x / ops.expand(mint.sqrt(mint.sum(x * x, dim=-1, keepdim=True)), x)


class CLIPModel(CompiledCell):
    """transformers' CLIPModel: text and vision towers, projections and logit_scale.

    Every tensor method runs through `run` (compiled with ms.jit in "graph" mode, eager in
    "pynative"). Gradients flow to the pixel inputs of `image_embeds` / `pair_scores`.
    """

    name = "clip"                     # the RewardModel protocol (ms_rm.rewards.base): CLIP score, PickScore
    input_kind = "pixels"
    format_name = FORMAT_NAME         # no converted folder records it: ms_rm reads Hugging Face folders as they are
    # from_pretrained(path, ...): load_clip_model's, attached in ms_rm.rewards.clip (beside the loader)

    def __init__(self, config: CLIPConfig, mode: str = "graph"):
        super().__init__(mode)
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = Linear(config.vision.tower.hidden_size, config.projection_dim, bias=False)
        self.text_projection = Linear(config.text.tower.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = Parameter(Tensor(np.float32(config.logit_scale_init_value)), name="logit_scale")

    # --- the RewardModel protocol (registry) ---------------------------------------------------
    @classmethod
    def recognizes(cls, path: str) -> bool:
        """Whether `path` is a Hugging Face CLIPModel folder (its config.json's model_type is "clip"),
        the folder this model loads instead of a converted one."""
        config = os.path.join(os.fspath(path), CONFIG_FILE)
        try:
            return os.path.isfile(config) and read_json(config, "CLIPModel config").get("model_type") == "clip"
        except ConfigError:                   # unreadable: not recognised (the caller's error says what it wanted)
            return False

    @classmethod
    def convert(cls, *sources: str, out: Optional[str] = None, **options: Any) -> str:
        """Nothing to convert: ms_rm reads a Hugging Face CLIPModel folder as transformers saves it."""
        raise ConfigError("a CLIP model needs no conversion: ms_rm reads the Hugging Face CLIPModel folder "
                          "(config.json + model.safetensors) as it is; score with it directly")

    def reward(self, pixel_values, input_ids) -> Tensor:
        """(B, 1) cosine of each image's and its text's embeddings (preprocessed pixel values
        (B, 3, S, S), token ids (B, L)); CLIPScorer adds the image preprocessing and tokenizer.
        `forward(*prepare(...))`, compiled in graph mode."""
        return self.run("forward", *self.prepare(pixel_values, input_ids))

    def prepare(self, pixel_values, input_ids) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Pixel values (B, 3, S, S) and token ids (B, L), checked, with the text's host tensors:
        `forward`'s tensors (pixel values, token ids, pooled-token one-hot, causal bias)."""
        return (self._pixel_values(pixel_values),) + self.text_inputs(input_ids)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, pooled_one_hot: Tensor, bias: Tensor) -> Tensor:
        """(B, 1) cosine of `prepare`'s tensors: pure, differentiable with respect to the pixels."""
        return mint.sum(self.image_embeds(pixel_values) * self.text_embeds(input_ids, pooled_one_hot, bias),
                        dim=-1, keepdim=True)

    def score(self, pixel_values, input_ids) -> List[float]:
        """One cosine per (image, text), as floats."""
        return [float(v) for v in self.reward(pixel_values, input_ids).asnumpy()[:, 0]]

    # --- compiled tensor programs ----------------------------------------------------------------
    def image_embeds(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, S, S) normalised pixels -> (B, P) image embeddings divided by their norms."""
        return _normalize(self.visual_projection(self.vision_model(pixel_values)))

    def text_embeds(self, input_ids: Tensor, pooled_one_hot: Tensor, bias: Tensor) -> Tensor:
        """(B, L) token ids, (B, L) one-hot of the pooled token, (1, 1, L, L) causal bias ->
        (B, P) text embeddings divided by their norms."""
        return _normalize(self.text_projection(self.text_model(input_ids, pooled_one_hot, bias)))

    def unit_pixel_embeds(self, pixels: Tensor, resize_h: Tensor, resize_w_t: Tensor, mean: Tensor,
                          std: Tensor) -> Tensor:
        """(B, 3, H, W) pixels in [0, 1] -> image embeddings, with the resize-and-crop as two
        matrix products (resize_h (S, H), resize_w_t (W, S); see preprocess.resize_matrices) and
        the normalisation inside the differentiable program."""
        b, c, h, w = pixels.shape
        s_h, s_w = resize_h.shape[0], resize_w_t.shape[1]
        x = mint.matmul(pixels.reshape(b * c * h, w), resize_w_t).reshape(b * c, h, s_w)     # resize the width
        x = mint.matmul(resize_h, x)                                                         # (B*3, S, S)
        x = x.reshape(b, c, s_h, s_w)
        x = (x - ops.expand(mean.reshape(1, c, 1, 1), x)) / ops.expand(std.reshape(1, c, 1, 1), x)
        return self.image_embeds(x)

    def scale(self) -> Tensor:
        """exp(logit_scale), a scalar."""
        return ops.exp(self.logit_scale)

    def logits_per_image(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """(B_img, B_txt): exp(logit_scale) x the cosine of every image with every text."""
        return mint.matmul(image_embeds, text_embeds.swapaxes(0, 1)) * ops.exp(self.logit_scale)

    # --- host-side entry points ---------------------------------------------------------------
    def text_inputs(self, input_ids: np.ndarray) -> Tuple[Tensor, Tensor, Tensor]:
        """The three tensors `text_embeds` takes, from (B, L) token ids."""
        ids = np.asarray(input_ids)
        text = self.config.text
        if ids.ndim != 2 or ids.shape[0] == 0 or not 0 < ids.shape[1] <= text.max_position_embeddings:
            raise InputError(f"input_ids must be (B, L) with B > 0 and 0 < L <= {text.max_position_embeddings}, "
                             f"got shape {ids.shape}")
        if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= text.vocab_size:
            raise InputError(f"input_ids must be integer token ids in [0, {text.vocab_size}), got dtype "
                             f"{ids.dtype}, range [{ids.min()}, {ids.max()}]")
        one_hot = np.eye(ids.shape[1], dtype=np.float32)[pooled_token_index(ids, text.eos_token_id)]
        return Tensor(ids.astype(np.int32)), Tensor(one_hot), Tensor(causal_bias(ids.shape[1]))

    def encode_text(self, input_ids: np.ndarray) -> Tensor:
        """(B, L) token ids -> (B, P) normalised text embeddings."""
        return self.run("text_embeds", *self.text_inputs(input_ids))

    def encode_images(self, pixel_values) -> Tensor:
        """(B, 3, S, S) pixel values as CLIPImageProcessor returns them -> (B, P) normalised embeddings."""
        return self.run("image_embeds", self._pixel_values(pixel_values))

    def _pixel_values(self, pixel_values) -> Tensor:
        size = self.config.vision.image_size
        pixel_values = pixel_values if isinstance(pixel_values, Tensor) else Tensor(np.asarray(pixel_values))
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size) or pixel_values.shape[0] == 0:
            raise InputError(f"pixel_values must be (B, 3, {size}, {size}) (preprocessed images), got "
                             f"{tuple(pixel_values.shape)}")
        return pixel_values.astype(ms.float32)

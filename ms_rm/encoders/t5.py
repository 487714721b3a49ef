"""T5's encoder (SD3's text_encoder_3, T5 v1.1 XXL) in MindSpore, with its weights kept as stored.

What it computes is transformers' `T5EncoderModel(input_ids).last_hidden_state` (transformers 4.57,
modeling_t5.py) without an attention mask, as diffusers calls it for SD3:

    h = shared[input_ids]                                                  # (B, L, D)
    bias = relative_attention_bias[bucket(k - q)]  (block 0's table)       # (1, H, L, L)
    each block:  x = rms(h) * ln0;  h += o(softmax(q(x) k(x)^T + bias) v(x))   (no 1/sqrt(d))
                 x = rms(h) * ln1;  h += wo(gelu_tanh(wi_0(x)) * wi_1(x))
    out = rms(h) * final_layer_norm

Memory is the point of this module: the released T5-XXL holds 4.7 B parameters (what they take,
in float32 and as stored: docs/measurements.md). Here every weight stays in the dtype of the file
(fp16 in the SD3.5 release) and one
compiled block, shared by all 24, casts its weights to float32 as it runs: the numbers are those
of a float32 model loaded from the same file (fp16 and bf16 widen to float32 exactly), at half
its memory. The embedding rows and the position bias are gathered on the host.
"""

from __future__ import annotations

import logging
import math
import os
import dataclasses
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from ..core import ops
from ..core.compile_cache import jit
from ..core.config import get_value
from ..core.errors import CheckpointError, ConfigError
from ..core.weights import check_key_sets, check_tensor
from ..io.files import find_weights, read_json
from ..io.safetensors_file import open_safetensors

logger = logging.getLogger(__name__)

BLOCK_WEIGHTS = ("layer.0.layer_norm.weight", "layer.0.SelfAttention.q.weight", "layer.0.SelfAttention.k.weight",
                 "layer.0.SelfAttention.v.weight", "layer.0.SelfAttention.o.weight", "layer.1.layer_norm.weight",
                 "layer.1.DenseReluDense.wi_0.weight", "layer.1.DenseReluDense.wi_1.weight",
                 "layer.1.DenseReluDense.wo.weight")
EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")      # tied: either, or both
RELATIVE_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
FINAL_NORM = "encoder.final_layer_norm.weight"
STORED_DTYPES = {np.dtype(np.float32): ms.float32, np.dtype(np.float16): ms.float16}


@dataclass(frozen=True)
class T5Config:
    """The fields of a transformers T5 config.json that the encoder uses."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_file(cls, path: str) -> "T5Config":
        raw = read_json(path, "T5 config", ConfigError)
        act = raw.get("feed_forward_proj", "relu")
        if act != "gated-gelu":
            raise ConfigError(f"{path}: feed_forward_proj is {act!r}; ms_rm's T5 encoder is T5 v1.1 "
                              "(\"gated-gelu\", SD3's text_encoder_3)")
        return cls(**{f.name: get_value(raw, f.name, float if f.type == "float" else int, path,
                                        default=f.default) for f in dataclasses.fields(cls)})


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(L, L) bucket of key j seen from query i: transformers' bidirectional
    `_relative_position_bucket(j - i)`, in float32 as torch computes it."""
    position = np.arange(length, dtype=np.int64)
    relative = position[None, :] - position[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    exact = half // 2
    scaled = (np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
              / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
    large = np.minimum(exact + scaled.astype(np.int64), half - 1)
    return buckets + np.where(distance < exact, distance, large)


class T5Block(nn.Cell):
    """One encoder block on float32 hidden states, its weights passed in (any float dtype)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.heads, self.eps = config.num_heads, config.layer_norm_epsilon

    def construct(self, h, bias, ln0, wq, wk, wv, wo, ln1, wi0, wi1, wff):
        f32 = ms.float32
        x = ops.rms_norm(h, ln0.astype(f32), self.eps)                               # (B, L, D)
        q, k, v = (ops.split_heads(ops.linear(x, w.astype(f32)), self.heads) for w in (wq, wk, wv))
        attended = ops.attention(q, k, v, bias, scale=1.0)                            # (B, H, L, d)
        h = h + ops.linear(ops.merge_heads(attended), wo.astype(f32))
        x = ops.rms_norm(h, ln1.astype(f32), self.eps)
        gated = ops.gelu(ops.linear(x, wi0.astype(f32)), approximate=True) * ops.linear(x, wi1.astype(f32))
        return h + ops.linear(gated, wff.astype(f32))                                 # (B, L, D)


class T5Encoder:
    """input_ids (B, L) -> last hidden state (B, L, D) in float32; weights in their stored dtype."""

    def __init__(self, config: T5Config, embedding: np.ndarray, relative_bias: np.ndarray,
                 blocks: List[List[Tensor]], final_norm: Tensor):
        self.config = config
        self.embedding = embedding                   # (V, D) numpy, stored dtype
        self.relative_bias = relative_bias           # (buckets, H) float32
        self.blocks, self.final_norm = blocks, final_norm
        self._block = T5Block(config)
        self._run_block = jit(self._block.construct, self._block, name="construct")
        self._final = jit(self._final_norm, self._block, name="final_norm")

    def _final_norm(self, h, weight):
        return ops.rms_norm(h, weight.astype(ms.float32), self.config.layer_norm_epsilon)

    @classmethod
    def from_pretrained(cls, folder: str) -> "T5Encoder":
        """From a transformers T5EncoderModel folder (config.json, model.safetensors or a sharded
        index): every tensor checked (shape, finite) and used, or declared (the tied copy of the
        embedding, decoder-free checkpoints only)."""
        folder = os.fspath(folder)
        config = T5Config.from_file(os.path.join(folder, "config.json"))
        path = find_weights(folder, ("model.safetensors.index.json", "model.safetensors"),
                            "a transformers T5EncoderModel saved as safetensors")
        d, inner = config.d_model, config.num_heads * config.d_kv
        shapes = {f"encoder.block.{i}.{name}": shape for i in range(config.num_layers)
                  for name, shape in zip(BLOCK_WEIGHTS, ((d,), (inner, d), (inner, d), (inner, d), (d, inner), (d,),
                                                         (config.d_ff, d), (config.d_ff, d), (d, config.d_ff)))}
        shapes.update({RELATIVE_BIAS: (config.relative_attention_num_buckets, config.num_heads), FINAL_NORM: (d,)})
        with open_safetensors(path) as source:
            keys = set(source.keys())
            embeddings = [k for k in EMBEDDING_KEYS if k in keys]
            if not embeddings:
                raise CheckpointError(f"{path}: no token embedding ({' or '.join(EMBEDDING_KEYS)})")
            check_key_sets(set(shapes) | set(embeddings), keys, path,
                           hint="is this SD3's text_encoder_3 (a T5EncoderModel)?")
            tensors: Dict[str, Tensor] = {name: _as_tensor(_checked(source, name, shape))
                                          for name, shape in shapes.items()}
            embedding = _checked(source, embeddings[0], (config.vocab_size, d))
        blocks = [[tensors.pop(f"encoder.block.{i}.{name}") for name in BLOCK_WEIGHTS] for i in range(config.num_layers)]
        logger.info("T5 encoder: %d blocks, weights kept in %s", config.num_layers, blocks[0][1].dtype)
        return cls(config, embedding, tensors[RELATIVE_BIAS].asnumpy().astype(np.float32), blocks,
                   tensors[FINAL_NORM])

    def position_bias(self, length: int) -> Tensor:
        """(1, H, L, L) float32: block 0's relative-position table at each (query, key) bucket."""
        buckets = relative_position_buckets(length, self.config.relative_attention_num_buckets,
                                            self.config.relative_attention_max_distance)
        return Tensor(np.ascontiguousarray(self.relative_bias[buckets].transpose(2, 0, 1)[None]))

    def __call__(self, input_ids) -> Tensor:
        ids = np.asarray(input_ids.asnumpy() if isinstance(input_ids, Tensor) else input_ids)
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ConfigError(f"token ids must lie in 0..{self.config.vocab_size - 1} (T5's vocabulary)")
        h = Tensor(self.embedding[ids].astype(np.float32))                          # (B, L, D)
        bias = self.position_bias(ids.shape[1])
        for weights in self.blocks:
            h = self._run_block(h, bias, *weights)
        return self._final(h, self.final_norm)


def _checked(source, name: str, shape) -> np.ndarray:
    """Tensor `name` in its stored dtype, its shape and values checked (finite)."""
    array = source.read(name)
    check_tensor(name, array, shape, source.source(name))
    if array.dtype not in STORED_DTYPES and array.dtype.name != "bfloat16":
        raise CheckpointError(f"{source.source(name)}: tensor '{name}' is {array.dtype}; expected float32, "
                              "float16 or bfloat16")
    return array


def _as_tensor(array: np.ndarray) -> Tensor:
    """The array as a Tensor of the same dtype (bf16 and fp16 kept as they are)."""
    return Tensor(array, dtype=STORED_DTYPES.get(array.dtype, ms.bfloat16))

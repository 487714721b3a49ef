"""What a latent reward model asks of its backbone: the Backbone protocol.

A reward model (ms_rm.rewards.diffusion_rm) holds one backbone and never asks which family it is:

* `text_inputs` / `optional_text_inputs`: the text arguments of a reward call the backbone takes,
  by name ("encoder_hidden_states", "pooled_projections", "encoder_attention_mask"); score runs and
  scorers read them to know what an inputs file or a text_conds mapping must hold;
* `check_text(batch, encoder_hidden_states, pooled_projections, encoder_attention_mask,
  check_values)`: the text checked once, as {argument name: value}, a form `text_tensors` and
  `check_text` itself accept again (sliced by rows with `take_rows`);
* `text_tensors(checked, height, width)`: the text tensors the backbone's construct takes after
  (latents, timestep), and the key of its host inputs for that input shape;
* `host_inputs(*key)`: the tensors computed on the host for that key (position tables, rotary
  tables, masks), as numpy arrays;
* `noise_groups(checked)`: one hashable key per sample, equal for samples of the same prompt
  (what common random numbers share);
* `from_reward_config(config)`: the backbone a RewardModelConfig describes, given only the options
  its family reads (FLUX: guidance and time convention).

Two implementations: `PooledTextBackbone` here (fixed-length text and a pooled vector: SD3, FLUX)
and `CaptionTextBackbone` in ms_rm.backbones.zimage (per-sample captions of variable length, no
pooled vector: Z-Image).
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Mapping, Protocol, Tuple, runtime_checkable

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..core.errors import InputError
from ..core.inputs import pooled_text


@runtime_checkable
class Backbone(Protocol):
    """A latent reward model's backbone (module notes)."""

    text_inputs: ClassVar[Tuple[str, ...]]
    optional_text_inputs: ClassVar[Tuple[str, ...]]

    @classmethod
    def from_reward_config(cls, config: Any) -> "Backbone": ...

    def check_text(self, batch: int, encoder_hidden_states: Any, pooled_projections: Any = None,
                   encoder_attention_mask: Any = None, check_values: bool = True) -> Dict[str, Any]: ...

    def text_tensors(self, text: Mapping[str, Any], height: int, width: int
                     ) -> Tuple[Tuple[Tensor, ...], Tuple]: ...

    def host_inputs(self, *key) -> Tuple[np.ndarray, ...]: ...

    def noise_groups(self, text: Mapping[str, Any]) -> List[bytes]: ...


def take_rows(value: Any, rows: Any) -> Any:
    """Rows of a batch-major tensor, array or list: `rows` a slice or a list of indices (a tensor
    stays on the device: gathered, not copied through the host)."""
    if value is None or isinstance(rows, slice):
        return None if value is None else value[rows]
    if isinstance(value, Tensor):
        return ms.ops.gather(value, Tensor(np.asarray(rows, np.int32)), 0)
    if isinstance(value, (list, tuple)):
        return [value[i] for i in rows]
    return np.asarray(value)[list(rows)]


class PooledTextBackbone:
    """Text as SD3 and FLUX take it: encoder_hidden_states (B, T, joint_attention_dim) and
    pooled_projections (B, pooled_projection_dim); the host inputs depend on (H, W, T, B)."""

    text_inputs: ClassVar[Tuple[str, ...]] = ("encoder_hidden_states", "pooled_projections")
    optional_text_inputs: ClassVar[Tuple[str, ...]] = ()

    @classmethod
    def from_reward_config(cls, config: Any):
        return cls(config.backbone, config.visual_head_idx, config.text_head_idx)

    def check_text(self, batch: int, encoder_hidden_states: Any, pooled_projections: Any = None,
                   encoder_attention_mask: Any = None, check_values: bool = True) -> Dict[str, Any]:
        if encoder_attention_mask is not None:
            raise InputError(f"encoder_attention_mask applies to variable-length text (Z-Image); this "
                             f"{self.config.family} model reads every row of encoder_hidden_states")
        ehs, pooled = pooled_text(encoder_hidden_states, pooled_projections, batch, self.config.joint_attention_dim,
                                  self.config.pooled_projection_dim, check_values)
        return {"encoder_hidden_states": ehs, "pooled_projections": pooled}

    def text_tensors(self, text: Mapping[str, Any], height: int, width: int) -> Tuple[Tuple[Tensor, ...], Tuple]:
        ehs, pooled = text["encoder_hidden_states"], text["pooled_projections"]
        return (ehs, pooled), (height, width, ehs.shape[1], ehs.shape[0])

    def noise_groups(self, text: Mapping[str, Any]) -> List[bytes]:
        """Equal pooled prompt embeddings mean the same prompt."""
        pooled = text["pooled_projections"]
        array = pooled.astype(ms.float32).asnumpy() if isinstance(pooled, Tensor) else np.asarray(pooled, np.float32)
        return [row.tobytes() for row in array]

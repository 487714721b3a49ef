"""Which tensors of a reference checkpoint the model reads, and why it reads no others.

Keys here are in the model's namespace (`backbone.*`, `reward_head.*`, `eta3`, `eta4`), the
namespace of a reference full_model.pt; a diffusers transformer's keys get `backbone.` first.
A key the model does not read is an error unless `unused_reason` names why it is not needed.
"""

from __future__ import annotations

import re
from typing import Optional

from .config import RewardModelConfig

BACKBONE = "backbone."
_BLOCK = re.compile(r"backbone\.transformer_blocks\.(\d+)\.(.+)")


def unused_reason(key: str, config: RewardModelConfig) -> Optional[str]:
    """Why the model does not read checkpoint tensor `key`, or None if it should."""
    if key == "backbone.pos_embed.pos_embed":
        return ("fixed sin-cos position table: ms_rm computes the crop it needs, rounded to this "
                "table's stored dtype (checked against it at conversion)")
    if key.startswith(("backbone.norm_out.", "backbone.proj_out.")):
        return "output layers of the full transformer, not part of the cut"
    if key.startswith("backbone.single_transformer_blocks."):
        return "FLUX single-stream block: the cut keeps double-stream blocks only"
    match = _BLOCK.match(key)
    if not match:
        return None
    index, rest = int(match.group(1)), match.group(2)
    if index >= config.last_depth:
        return f"block {index} lies after the deepest tap (depth {config.last_depth})"
    image_out, context_out = config.block_streams(index)
    if not image_out and rest.startswith(("attn2.", "ff.")):
        return f"block {index}'s image output is not tapped"
    if not context_out and rest.startswith(("ff_context.", "attn.to_add_out.")):
        return f"block {index}'s text output is not tapped"
    return None

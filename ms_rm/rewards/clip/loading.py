"""Loading a Hugging Face `CLIPModel` folder strictly: config.json + model.safetensors (or a
sharded set through model.safetensors.index.json), as `save_pretrained` writes it.

Every parameter is filled from the file and every tensor in it is used, except the
`position_ids` buffers that transformers before 4.31 saved (checked to be 0..n-1, then
ignored); shapes must match the config and values must be finite, otherwise a one-line
CheckpointError lists the keys. Tensors are read one at a time and bf16 / fp16 ones upcast to
fp32, so loading holds the model plus one tensor in memory.
"""

from __future__ import annotations

import logging

import numpy as np

from ...core.errors import CheckpointError
from ...core.weights import load_parameters
from ...io.files import find_weights
from ...io.safetensors_file import open_safetensors
from .config import load_clip_config
from .model import CLIPModel

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors")
POSITION_ID_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def load_clip_model(folder: str, mode: str = "graph") -> CLIPModel:
    """The CLIPModel saved in `folder` (fp32 compute)."""
    config = load_clip_config(folder)
    path = find_weights(folder, WEIGHT_FILES, "a transformers CLIPModel saved with save_pretrained (safetensors)")
    model = CLIPModel(config, mode=mode)
    with open_safetensors(path) as source:
        names = [k for k in source.keys() if k not in POSITION_ID_BUFFERS]
        for key in POSITION_ID_BUFFERS:
            if key in source:
                ids = source.read(key)
                if not np.array_equal(ids.reshape(-1), np.arange(ids.size)):
                    raise CheckpointError(f"{source.source(key)}: buffer '{key}' is not 0..{ids.size - 1}; ms_rm "
                                          "uses the default positions only")
        load_parameters(model, source.read, names, source.path)
    logger.info("loaded CLIPModel from %s (%d parameters)", folder, sum(p.size for p in model.get_parameters()))
    return model

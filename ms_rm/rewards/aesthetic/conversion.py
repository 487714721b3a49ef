"""The aesthetic predictor's two published parts -> one ms_rm converted folder.

* The `.pth` (sac+logos+ava1-l14-linearMSE.pth): the MLP's torch state dict, keys `layers.0`,
  `layers.2`, `layers.4`, `layers.6`, `layers.7` (`.weight`, `.bias`; the odd indices are its
  Dropouts). Read with weights_only=True (ms_rm.io.torch_file). The widths are read off its
  shapes (released: 768 -> 1024 -> 128 -> 64 -> 16 -> 1), so the layout must be the released one
  for those widths: any missing or extra key, a shape that does not chain, or a last layer that
  is not one output is a one-line CheckpointError naming the `.pth`'s keys.
* A transformers CLIPModel folder (openai/clip-vit-large-patch14): config.json, model.safetensors
  (or a sharded set) and preprocessor_config.json (in the folder, or `image_processor`'s folder).
  `vision_model.*` and `visual_projection.weight` are used; the text tower, `text_projection` and
  `logit_scale` are declared unused (the predictor reads no text), as are the `position_ids`
  buffers old transformers saved (checked 0..n-1). Its projection_dim must be the MLP's input
  width.

Every parameter is filled from one of the two files; the manifest lists both sources and every
unused key with its reason.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ...core.errors import CheckpointError, ConfigError
from ...core.weights import check_key_sets
from ...io.converted import write_converted
from ...io.files import check_new_output, find_weights, read_json
from ...io.safetensors_file import open_safetensors
from ...io.torch_file import TorchStateFile
from ..clip.config import CONFIG_FILE, PREPROCESSOR_FILE
from ..clip.loading import POSITION_ID_BUFFERS, WEIGHT_FILES
from ..diffusion_rm.conversion import OUT_DTYPES
from .config import AestheticConfig

logger = logging.getLogger(__name__)

MLP_PREFIX = "mlp."
CLIP_USED = ("vision_model.", "visual_projection.weight")
CLIP_UNUSED = {"text_model.": "CLIP's text tower: the aesthetic predictor reads no text",
               "text_projection.weight": "CLIP's text projection: the aesthetic predictor reads no text",
               "logit_scale": "CLIP's image-text temperature: not part of the aesthetic score"}
HINT_PTH = ("Is this the aesthetic predictor's MLP state dict (sac+logos+ava1-l14-linearMSE.pth, keys layers.0, "
            "layers.2, layers.4, layers.6, layers.7)?")


def mlp_widths(source: TorchStateFile) -> Tuple[int, Tuple[int, ...]]:
    """(input width, hidden widths) read off the `.pth`'s `layers.N.weight` shapes."""
    indices = sorted(int(k.split(".")[1]) for k in source.keys()
                     if k.startswith("layers.") and k.endswith(".weight") and k.split(".")[1].isdigit())
    if not indices:
        raise CheckpointError(f"{source.path}: no 'layers.N.weight' tensors (keys: {sorted(source.keys())[:6]}). "
                              f"{HINT_PTH}")
    shapes = []
    for i in indices:
        shape = source.shape(f"layers.{i}.weight")
        if len(shape) != 2:
            raise CheckpointError(f"{source.path}: 'layers.{i}.weight' has shape {shape}, expected (out, in). "
                                  f"{HINT_PTH}")
        shapes.append(shape)
    for (i, (out, _)), (j, (_, nxt)) in zip(zip(indices, shapes), zip(indices[1:], shapes[1:])):
        if out != nxt:
            raise CheckpointError(f"{source.path}: 'layers.{i}.weight' has {out} outputs but 'layers.{j}.weight' "
                                  f"takes {nxt} inputs. {HINT_PTH}")
    if shapes[-1][0] != 1:
        raise CheckpointError(f"{source.path}: the last layer 'layers.{indices[-1]}.weight' has {shapes[-1][0]} "
                              f"outputs, expected 1 (the score). {HINT_PTH}")
    return shapes[0][1], tuple(s[0] for s in shapes[:-1])


def _clip_reason(key: str) -> Optional[str]:
    for start, reason in CLIP_UNUSED.items():
        if key == start or start.endswith(".") and key.startswith(start):
            return reason
    if key in POSITION_ID_BUFFERS:
        return "the index buffer 0..n-1 (checked): positions are taken in order"
    return None


def read_clip_folder(clip: str, image_processor: Optional[str]) -> Tuple[dict, dict, str]:
    """(config.json, preprocessor_config.json, weights path) of a transformers CLIPModel folder."""
    if not os.path.isdir(clip):
        raise ConfigError(f"{clip}: not a folder; pass the transformers CLIPModel folder "
                          "(openai/clip-vit-large-patch14)")
    config = read_json(os.path.join(clip, CONFIG_FILE), "CLIPModel config")
    if config.get("model_type", "clip") != "clip":
        raise ConfigError(f"{os.path.join(clip, CONFIG_FILE)}: model_type {config.get('model_type')!r} is not 'clip'; "
                          "pass a transformers CLIPModel folder")
    folder = image_processor or clip
    processor_path = os.path.join(folder, PREPROCESSOR_FILE)
    if not os.path.isfile(processor_path):
        raise ConfigError(f"{folder}: no {PREPROCESSOR_FILE} (CLIPImageProcessor's settings); pass the folder "
                          "that holds it with --image-processor")
    processing = read_json(processor_path, "image processor config")
    weights = find_weights(clip, WEIGHT_FILES, "a transformers CLIPModel saved with save_pretrained (safetensors)")
    return config, processing, weights


def convert(pth: str, clip: str, out: str, parameter_shapes: Callable[[AestheticConfig], Dict[str, Tuple[int, ...]]],
            image_processor: Optional[str] = None, dtype: str = "keep", force: bool = False,
            progress: bool = True) -> str:
    """`.pth` + CLIP folder -> converted folder `out` (written atomically); its path."""
    if dtype not in OUT_DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(OUT_DTYPES)}, got {dtype!r}")
    out = check_new_output(out, force)
    clip_dict, processing_dict, weights = read_clip_folder(clip, image_processor)
    mlp = TorchStateFile(pth)
    try:
        in_width, widths = mlp_widths(mlp)
        config = AestheticConfig.build(clip_dict, processing_dict, widths, os.path.join(clip, CONFIG_FILE))
        if config.in_width != in_width:
            raise CheckpointError(f"{pth}: the MLP takes {in_width} features ('layers.0.weight'), but the CLIP folder "
                                  f"{clip} projects to projection_dim {config.in_width}; pass the CLIP model the "
                                  "predictor was trained on (ViT-L/14: 768)")
        shapes = parameter_shapes(config)
        check_key_sets({n[len(MLP_PREFIX):] for n in shapes if n.startswith(MLP_PREFIX)}, mlp.keys(), pth, HINT_PTH)
        with open_safetensors(weights) as tower:
            return _write(out, config, shapes, mlp, tower, pth, dtype, force, progress)
    finally:
        mlp.close()


def _write(out, config, shapes, mlp, tower, pth, dtype, force, progress) -> str:
    origin: Dict[str, Tuple[object, str]] = {}
    unused: Dict[str, str] = {}
    for key in tower.keys():
        if key.startswith(CLIP_USED):
            origin[key] = (tower, key)
            continue
        reason = _clip_reason(key)
        if reason is None:
            origin[key] = (tower, key)                # reported as unexpected below
        else:
            unused[key] = reason
    for key in POSITION_ID_BUFFERS:
        if key in unused:
            ids = np.asarray(tower.read(key)).reshape(-1)
            if not np.array_equal(ids, np.arange(ids.size)):
                raise CheckpointError(f"{tower.source(key)}: buffer '{key}' is not 0..{ids.size - 1}; ms_rm uses the "
                                      "default positions only")
    check_key_sets({n for n in shapes if not n.startswith(MLP_PREFIX)}, origin, tower.path,
                   "Is this a transformers CLIPModel folder, and does its config.json describe it?")
    for name in shapes:
        if name.startswith(MLP_PREFIX):
            origin[name] = (mlp, name[len(MLP_PREFIX):])
    problems = [f"'{key}' has shape {tuple(src.shape(key))}, the model expects {shapes[name]}"
                for name, (src, key) in origin.items() if tuple(src.shape(key)) != shapes[name]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{pth} / {tower.path}: " + "; ".join(problems[:3]) + more)

    def out_dtype(name: str) -> np.dtype:
        src, key = origin[name]
        return OUT_DTYPES[dtype] or src.dtype(key)

    def produce(name: str) -> np.ndarray:
        src, key = origin[name]
        stored = src.read(key)
        if not np.isfinite(stored.astype(np.float32)).all():
            raise CheckpointError(f"{src.path}: tensor '{key}' has NaN/Inf values")
        wanted = out_dtype(name)
        return stored if stored.dtype == wanted else stored.astype(wanted)

    names: List[str] = list(shapes)
    logger.info("%s: %d tensors not used (see manifest.json)", tower.path, len(unused))
    return write_converted(
        out, config=config.to_dict(), specs=[(n, out_dtype(n), shapes[n]) for n in names], produce=produce,
        describe=lambda n: {"shape": list(shapes[n]), "from": f"{os.path.basename(origin[n][0].path)}:{origin[n][1]}"},
        sources=[mlp.path, tower.path], manifest={"dtype": dtype, "unused": {"clip": unused}},
        force=force, progress=progress)

"""Scoring arrays from an .npz file: what `ms-rm score` does, and how a conversion is checked by hand.

Inputs file: `latents` (B, C, H, W), `encoder_hidden_states` (B, T, J), `pooled_projections`
(B, P), optionally `noise` (B, C, H, W), used instead of random noise. Output file: `reward`
(B, out_dim), `sigma` and `timestep` (B,), and with features=True `temb`, `visual_tap_{k}`,
`text_tap_{k}` and `raw`. Written atomically.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from typing import Dict, Optional, Sequence, Union

import numpy as np

from .errors import InputError

REQUIRED = ("latents", "encoder_hidden_states", "pooled_projections")


def read_inputs(path: str) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"{path}: inputs file not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{path}: not a readable .npz file ({e})") from None
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise InputError(f"{path}: missing arrays {missing}; it must hold {list(REQUIRED)} (and may hold noise)")
    unknown = sorted(set(arrays) - set(REQUIRED) - {"noise"})
    if unknown:
        raise InputError(f"{path}: unknown arrays {unknown}; expected {list(REQUIRED)} and optionally noise")
    return arrays


def score_arrays(model, arrays: Dict[str, np.ndarray], u: Union[float, Sequence[float]],
                 seed: Optional[int] = None, features: bool = False) -> Dict[str, np.ndarray]:
    """Run the model on the arrays of an inputs file; the arrays of an output file."""
    noise = arrays.get("noise")
    stages = model.reward_stages(arrays["latents"], arrays["encoder_hidden_states"], arrays["pooled_projections"],
                                 u=u, noise=noise, seed=None if noise is not None else seed)
    keep = stages if features else {k: stages[k] for k in ("reward", "sigma", "timestep")}
    return {k: v.astype("float32").asnumpy() for k, v in keep.items()}


def write_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
    """np.savez to a temporary file beside `path`, then rename: no half-written outputs."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

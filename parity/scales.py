"""Weight scales of the parity builders, and the input ranges their models' activations reach.

Two measurements, torch side only, for the parity cases of the pixel reward models and the
generator (ImageReward, CLIP, the SD3 VAE encoder and decoder, the SD3 transformer):

* `init_scales(model)`: for every parameter group, the standard deviation the builder draws
  against the one the reference's own initialisers give (the same class built with its own
  constructor: BLIP's trunc_normal(0.02) ViT and BERT normal(initializer_range) with the MLP's
  normal(1 / (768 + 1)); transformers CLIPModel's _init_weights; torch's default
  kaiming_uniform(a=sqrt(5)) for diffusers' AutoencoderKL and SD3Transformer2DModel, which have
  no initialiser of their own). A ratio below 1 is a builder smaller than the initialiser: a
  range a user's weights reach that the case would not.
* `activation_ranges(run)`: the largest |input| that GELU, SiLU, sigmoid, tanh, exp and softmax
  (the attention logits of scaled_dot_product_attention included) see while `run()` executes
  torch code, by wrapping those torch functions for its duration.

`python -m ms_rm_parity.scales` prints both for each model at the default scale and at the
large-weight cases' MATRIX_SCALE.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterator, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

MATRIX_SCALE = 3.0     # the large-weight cases: every matrix / kernel (and the VAE's and SD3's norms) this much larger
MODELS = ("imagereward", "clip", "sd3-vae", "sd3-transformer")


def scale_matrices_(module: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Every parameter of two or more dimensions (matrices, conv kernels, embedding tables, position
    tables) x `scale`; vectors (norm weights, biases) kept: builders.randomize_'s matrix_scale."""
    if scale != 1.0:
        with torch.no_grad():
            for param in module.parameters():
                if param.dim() >= 2:
                    param.mul_(scale)
    return module


def scale_norms_(module: torch.nn.Module, scale: float, kinds: Tuple[str, ...]) -> torch.nn.Module:
    """The weight of every norm module whose class is named in `kinds` x `scale`: where a norm
    right before an activation or an attention's logits would undo scale_matrices_ (the VAE's
    GroupNorms before SiLU, SD3's RMS qk-norms), the large-weight cases scale it too."""
    if scale != 1.0:
        with torch.no_grad():
            for sub in module.modules():
                if type(sub).__name__ in kinds and getattr(sub, "weight", None) is not None:
                    sub.weight.mul_(scale)
    return module


# --- activation ranges ------------------------------------------------------------------------

def _attention_logits(q, k, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if k.shape[-3] != q.shape[-3]:                       # grouped heads
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    return (q @ k.transpose(-2, -1)) * scale


MASKED = 1e3           # softmax inputs at or below -MASKED are attention masks (-1e4, dtype min), not logits
ACTIVATION_MODULES = {"GELU": "gelu", "GELUActivation": "gelu", "QuickGELUActivation": "quick_gelu",
                      "NewGELUActivation": "gelu", "SiLU": "silu", "SiLUActivation": "silu", "Tanh": "tanh",
                      "Sigmoid": "sigmoid", "Softmax": "softmax"}


@contextlib.contextmanager
def activation_ranges(*modules: torch.nn.Module) -> Iterator[Dict[str, float]]:
    """Inside: the largest |input| of each activation torch computes (a dict filled as it runs):
    the torch functions wrapped, and a pre-hook on each activation module of `modules` (transformers'
    activations hold the function they were built with, out of the wrappers' reach). diffusers' GELU
    modules (a projection, then F.gelu) are left to the function wrapper."""
    seen: Dict[str, float] = {}

    def note(name, x):
        if torch.is_tensor(x) and x.is_floating_point() and x.numel():
            x = x.detach()
            if name == "softmax":
                x = x[x > -MASKED]
            if x.numel():
                seen[name] = max(seen.get(name, 0.0), float(x.abs().max()))

    hooks = []
    for root in modules:
        for module in root.modules():
            kind = ACTIVATION_MODULES.get(type(module).__name__)
            if kind is not None and not hasattr(module, "proj"):
                hooks.append(module.register_forward_pre_hook(lambda m, args, kind=kind: note(kind, args[0])))

    patches: List[Tuple[object, str, Callable]] = []

    def wrap(owner, attr, name, pick=lambda args, kwargs: args[0]):
        original = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            note(name, pick(args, kwargs))
            return original(*args, **kwargs)

        patches.append((owner, attr, original))
        setattr(owner, attr, wrapper)

    def sdpa_logits(args, kwargs):
        q = args[0] if args else kwargs["query"]
        k = args[1] if len(args) > 1 else kwargs["key"]
        return _attention_logits(q, k, kwargs.get("scale"))

    wrap(F, "gelu", "gelu")
    wrap(F, "silu", "silu")
    wrap(torch, "sigmoid", "sigmoid")
    wrap(torch.Tensor, "sigmoid", "sigmoid")
    wrap(torch, "tanh", "tanh")
    wrap(torch.Tensor, "tanh", "tanh")
    wrap(torch, "exp", "exp")
    wrap(torch.Tensor, "exp", "exp")
    wrap(F, "softmax", "softmax")
    wrap(torch, "softmax", "softmax")
    wrap(torch.Tensor, "softmax", "softmax", pick=lambda args, kwargs: args[0])
    wrap(F, "scaled_dot_product_attention", "softmax", pick=sdpa_logits)
    try:
        yield seen
    finally:
        for owner, attr, original in reversed(patches):
            setattr(owner, attr, original)
        for hook in hooks:
            hook.remove()


# --- the models ---------------------------------------------------------------------------------

def _imagereward(scale: float, reference_init: bool = False):
    from ms_rm.rewards.imagereward import tiny_config

    from .imagereward import tiny_inputs
    from .imagereward_reference import build_reference, reference_stages

    config = tiny_config()
    model = build_reference(config, 0, matrix_scale=scale, reference_init=reference_init)
    pixels, _, ids, mask = tiny_inputs(config, 0)
    return model, lambda: reference_stages(model, pixels, ids, mask)


def _clip(scale: float, reference_init: bool = False):
    import tempfile

    from .clip_parity import VARIANTS, _images, write_tiny_clip

    models = {}
    with tempfile.TemporaryDirectory() as folder:
        for variant in VARIANTS:
            models[variant] = write_tiny_clip(f"{folder}/{variant}", variant, 0, matrix_scale=scale,
                                              reference_init=reference_init)
    def run():
        for model, tokenizer, processor in models.values():
            pixels = processor(images=_images(0), return_tensors="pt")["pixel_values"]
            tokens = tokenizer(["a red cube on a table", "two cats", "the blue sky"], padding="max_length",
                               max_length=77, return_tensors="pt")
            with torch.no_grad():
                model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)

    return tuple(m for m, _, _ in models.values()), run


def _vae(scale: float, reference_init: bool = False):
    from .vae_reference import build_reference_vae, tiny_vae_config

    model = build_reference_vae(tiny_vae_config(), 0, matrix_scale=scale, norm_scale=scale,
                                reference_init=reference_init)
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32))
    latents = torch.from_numpy(rng.standard_normal((2, 16, 4, 4), dtype=np.float32))

    def run():
        with torch.no_grad():
            model.encode(pixels).latent_dist.mode()
            model.decode(latents / model.config.scaling_factor + model.config.shift_factor)

    return model, run


def _transformer(scale: float, reference_init: bool = False):
    from .generator import _inputs, build_transformer

    model = build_transformer(0, matrix_scale=scale, norm_scale=scale, reference_init=reference_init)
    a = _inputs(0)

    def run():
        with torch.no_grad():
            model(hidden_states=torch.from_numpy(a["noise"]), timestep=torch.tensor([1000.0, 437.5]),
                  encoder_hidden_states=torch.from_numpy(a["ehs"]), pooled_projections=torch.from_numpy(a["pooled"]))

    return model, run


BUILDERS = {"imagereward": _imagereward, "clip": _clip, "sd3-vae": _vae, "sd3-transformer": _transformer}


def model_activation_ranges(model: str, scale: float = 1.0) -> Dict[str, float]:
    """Largest |input| of each activation in one fp32 torch run of `model`'s parity reference."""
    built, run = BUILDERS[model](scale)
    with activation_ranges(*(built if isinstance(built, tuple) else (built,))) as seen:
        run()
    return dict(seen)


def _group(name: str, param: torch.Tensor) -> str:
    if param.dim() >= 2:
        return "matrices"
    return "norm weights" if "norm" in name.lower() and name.endswith("weight") else "biases / vectors"


def _parameters(built) -> Dict[str, torch.Tensor]:
    models = built if isinstance(built, tuple) else (built,)
    return {f"{i}.{n}": p for i, m in enumerate(models) for n, p in m.named_parameters()}


def init_scales(model: str) -> Dict[str, dict]:
    """Per parameter group (matrices, norm weights, biases / vectors) of `model`'s parity reference:
    `ratio`, the (min, median, max) over its parameters of the builder's std / the std the reference's
    own initialisers give, where that is not 0; `constant`, how many the initialisers set to a
    constant (0 or 1), and `builder_std`, the builder's (min, max) std over those."""
    built = _parameters(BUILDERS[model](1.0)[0])
    initial = _parameters(BUILDERS[model](1.0, reference_init=True)[0])
    groups: Dict[str, dict] = {}
    for name, param in built.items():
        if param.numel() < 2:
            continue
        ours, theirs = float(param.detach().double().std()), float(initial[name].detach().double().std())
        group = groups.setdefault(_group(name, param), {"ratio": [], "constant": []})
        (group["ratio"] if theirs > 0 else group["constant"]).append(ours / theirs if theirs > 0 else ours)
    spread = lambda v: (min(v), float(np.median(v)), max(v)) if v else None
    return {g: {"ratio": spread(v["ratio"]), "constant": len(v["constant"]),
                "builder_std": (min(v["constant"]), max(v["constant"])) if v["constant"] else None}
            for g, v in groups.items()}


def main() -> None:
    torch.set_num_threads(2)
    for model in MODELS:
        print(f"{model}: builder std / reference initialiser std (min, median, max)")
        for group, row in init_scales(model).items():
            line = f"  {group:<18}"
            if row["ratio"]:
                line += " ratio {:.3g} / {:.3g} / {:.3g}".format(*row["ratio"])
            if row["constant"]:
                line += " ; {} constant at init, builder std {:.3g}-{:.3g}".format(row["constant"], *row["builder_std"])
            print(line)
        for scale in (1.0, MATRIX_SCALE):
            ranges = model_activation_ranges(model, scale)
            seen = ", ".join(f"{k} {v:.3g}" for k, v in sorted(ranges.items()))
            print(f"  max |input| at matrix scale {scale:g}: {seen}")


if __name__ == "__main__":
    main()

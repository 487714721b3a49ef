"""The torch side of ImageReward parity: the published `image-reward==1.5` package's own model code.

The package is installed without its dependencies into a folder of its own, not site-packages
(`pip install --no-deps --upgrade --target .deps/image-reward image-reward==1.5 timm==0.6.13`, the
README's install; elsewhere name the folder in MS_RM_IMAGEREWARD_PACKAGES): its declared timm pin
needs torchvision, whose PyPI build for torch 2.13 is a CUDA build that breaks the CPU torch, and a
timm in site-packages makes mindone's transformers import it (and fail on torchvision). The folder
is on sys.path only while the modules load, and the timm / fairscale modules leave sys.modules
afterwards (the loaded classes keep what they use). The modules are loaded with these shims, all on
the test side:

* the package's `__init__` files are skipped (bare package modules are registered first): the top
  one imports ReFL.py (accelerate, datasets, torchvision) and the scores (CLIP, BLIP, aesthetic);
* `transformers.modeling_utils` gets back three helpers that moved to `transformers.pytorch_utils`
  by 4.57 (apply_chunking_to_forward, find_pruneable_heads_and_indices, prune_linear_layer), which
  med.py imports from the old place;
* timm 0.6.13's top-level `__init__` and `timm.models` import torchvision, so bare `timm` and
  `timm.models` modules are registered and only the submodules vit.py and blip.py read are loaded
  from the installed timm (`layers`, `registry`, `helpers`, `hub`); `timm.models.vision_transformer`
  (which imports timm.data, hence torchvision) is a stand-in exporting timm's own PatchEmbed (from
  timm.models.layers) and a `_cfg` that vit.py imports but ImageReward never calls;
* fairscale (an sdist that needs building) is a stand-in whose checkpoint_wrapper refuses to run:
  vit.py wraps blocks with it only for gradient checkpointing, which ImageReward never enables;
* `torchvision.transforms` is a stand-in while ImageReward.py and models/BLIPScore.py are imported (removed right after, so
  nothing else sees it); its classes only build the PIL preprocessing the parity does not call
  (the preprocessing is checked against PIL and torch's interpolate instead, see ms_rm_parity.imagereward);
* BLIP_Pretrain.__init__ downloads bert-base-uncased's tokenizer and hard-codes ViT-L: the tiny
  models are assembled from the package's own classes (VisionTransformer, BertModel, MLP,
  BLIP_Pretrain, ImageReward) without their constructors' fixed sizes, and the full-size count
  replaces init_tokenizer with a local synthetic vocabulary;
* the wheel ships no med_config.json: `med_config` writes BLIP's bert-base config from its facts.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from typing import Dict, Optional

import numpy as np
import torch

# BLIP's configs/med_config.json (bert-base with cross-attention), from its published values.
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
              "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
              "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0,
              "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}

_LOADED: Optional[types.SimpleNamespace] = None


def _module(name: str, path: Optional[str] = None, **attrs) -> types.ModuleType:
    """A module object with a spec (importlib.util.find_spec reads it), a package when `path` is given."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=path is not None)
    if path is not None:
        module.__path__ = module.__spec__.submodule_search_locations = [path]
    module.__dict__.update(attrs)
    return module


def _bare_package(name: str, path: str) -> None:
    """The package `name` at `path`, registered without running its __init__."""
    if name not in sys.modules:
        sys.modules[name] = _module(name, path)


def _stand_in(name: str, package: bool = False, **attrs) -> types.ModuleType:
    return _module(name, "" if package else None, **attrs)


def _refuse(*args, **kwargs):
    raise NotImplementedError("fairscale stand-in: gradient checkpointing is not available in the parity shims")


INSTALL = "pip install --no-deps --upgrade --target .deps/image-reward image-reward==1.5 timm==0.6.13"


def packages_folder() -> str:
    """Where image-reward and timm are installed (MS_RM_IMAGEREWARD_PACKAGES, else the checkout's
    .deps/image-reward)."""
    default = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), ".deps", "image-reward")
    return os.environ.get("MS_RM_IMAGEREWARD_PACKAGES", default)


def installed() -> bool:
    folder = packages_folder()
    return all(os.path.isdir(os.path.join(folder, top)) for top in ("ImageReward", "timm"))


def _package_dir(top: str) -> str:
    path = os.path.join(packages_folder(), top)
    if not os.path.isdir(path):
        raise ImportError(f"{path} is missing: run, in the checkout, {INSTALL} (or set MS_RM_IMAGEREWARD_PACKAGES)")
    return path


def load_package() -> types.SimpleNamespace:
    """The package's modules: vit, med, blip_pretrain, image_reward (ImageReward.py), with the shims."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for helper in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        if not hasattr(modeling_utils, helper):
            setattr(modeling_utils, helper, getattr(pytorch_utils, helper))

    sys.path.insert(0, packages_folder())
    try:
        _LOADED = _load_modules()
    finally:
        sys.path.remove(packages_folder())
        for name in [n for n in sys.modules if n.split(".")[0] in ("timm", "fairscale")]:
            del sys.modules[name]               # mindone imports timm when it can find one
    return _LOADED


def _load_modules() -> types.SimpleNamespace:
    timm_dir = _package_dir("timm")
    _bare_package("timm", timm_dir)
    sys.modules["timm"].__version__ = "0.6.13"
    _bare_package("timm.models", os.path.join(timm_dir, "models"))
    layers = importlib.import_module("timm.models.layers")
    importlib.import_module("timm.models.registry")
    importlib.import_module("timm.models.helpers")
    importlib.import_module("timm.models.hub")
    sys.modules.setdefault("timm.models.vision_transformer", _stand_in(
        "timm.models.vision_transformer", PatchEmbed=layers.PatchEmbed, _cfg=lambda url="", **kwargs: dict(url=url, **kwargs)))
    for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint"):
        sys.modules[name] = _stand_in(name, package=True)
    sys.modules["fairscale.nn.checkpoint.checkpoint_activations"] = _stand_in(
        "fairscale.nn.checkpoint.checkpoint_activations", checkpoint_wrapper=_refuse)

    root = _package_dir("ImageReward")
    _bare_package("ImageReward", root)
    _bare_package("ImageReward.models", os.path.join(root, "models"))
    _bare_package("ImageReward.models.BLIP", os.path.join(root, "models", "BLIP"))
    vit = importlib.import_module("ImageReward.models.BLIP.vit")
    med = importlib.import_module("ImageReward.models.BLIP.med")
    blip = importlib.import_module("ImageReward.models.BLIP.blip")
    blip_pretrain = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")

    class _Transform:                       # torchvision.transforms stand-in: built, never called
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            raise NotImplementedError("torchvision stand-in: the parity does not run the PIL preprocessing")

    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.transforms")}
    sys.modules["torchvision"] = _stand_in("torchvision", package=True)
    sys.modules["torchvision.transforms"] = _stand_in(
        "torchvision.transforms", Compose=_Transform, Resize=_Transform, CenterCrop=_Transform, ToTensor=_Transform,
        Normalize=_Transform, InterpolationMode=types.SimpleNamespace(BICUBIC="bicubic"))
    try:
        image_reward = importlib.import_module("ImageReward.ImageReward")
        blip_score = importlib.import_module("ImageReward.models.BLIPScore")
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    return types.SimpleNamespace(vit=vit, med=med, blip=blip, blip_pretrain=blip_pretrain, image_reward=image_reward,
                                 blip_score=blip_score)


def med_config(config) -> "object":
    """The package's BertConfig for an ms_rm ImageRewardConfig: BLIP's med_config.json with its sizes."""
    pkg = load_package()
    t = config.text
    values = dict(MED_CONFIG, hidden_size=t.width, num_hidden_layers=t.layers, num_attention_heads=t.heads,
                  intermediate_size=t.intermediate, max_position_embeddings=t.max_positions,
                  layer_norm_eps=t.eps, vocab_size=t.vocab_size, pad_token_id=t.pad_token_id)
    bert_config = pkg.med.BertConfig.from_dict(values)
    bert_config.encoder_width = config.vision.width          # as BLIP_Pretrain sets it
    return bert_config


def build_reference(config, seed: int = 0, matrix_scale: float = 1.0, reference_init: bool = False) -> torch.nn.Module:
    """The package's ImageReward with `config`'s sizes, every weight random (weights.random_parameter,
    so the MLP's near-constant default init is replaced), in eval mode. `matrix_scale`: every
    parameter of two or more dimensions that much larger (the large-weight case); `reference_init`:
    the package's own initialisers' values kept instead (ms_rm_parity.scales compares the two)."""
    from ms_rm.core.weights import random_parameter

    pkg = load_package()
    torch.manual_seed(seed)
    v = config.vision
    blip = pkg.blip_pretrain.BLIP_Pretrain.__new__(pkg.blip_pretrain.BLIP_Pretrain)
    torch.nn.Module.__init__(blip)
    blip.visual_encoder = pkg.vit.VisionTransformer(img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width,
                                                    depth=v.layers, num_heads=v.heads, mlp_ratio=v.mlp_ratio)
    blip.text_encoder = pkg.med.BertModel(config=med_config(config), add_pooling_layer=False)
    blip.vision_proj = torch.nn.Linear(v.width, 256)          # in the released file, unused by the reward
    blip.text_proj = torch.nn.Linear(config.text.width, 256)
    model = pkg.image_reward.ImageReward.__new__(pkg.image_reward.ImageReward)
    torch.nn.Module.__init__(model)
    model.device = "cpu"
    model.blip = blip
    model.mlp = pkg.image_reward.MLP(config.text.width)
    model.mean, model.std = 0.16717362830052426, 1.0333394966054072
    if reference_init:
        return model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = torch.from_numpy(random_parameter(name, tuple(p.shape), seed))
            if p.ndim == 1 and "norm" in name.lower() and name.endswith(".weight"):
                value = value + 1.0          # LayerNorm scales near 1, or every feature shrinks to its bias
            if p.ndim >= 2:
                value = value * matrix_scale
            p.copy_(value)
    return model.eval()


def save_checkpoint(model: torch.nn.Module, path: str) -> str:
    """The model's state dict saved as the released ImageReward.pt is (buffers included)."""
    torch.save(model.state_dict(), path)
    return path


def reference_stages(model, pixels: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray,
                     dtype=torch.float32) -> Dict[str, np.ndarray]:
    """image features, [CLS] feature and reward (score_gard) of preprocessed pixels."""
    put = lambda a: torch.from_numpy(np.asarray(a)).to(dtype)
    ids, mask = torch.from_numpy(input_ids).long(), torch.from_numpy(attention_mask).long()
    with torch.no_grad():
        image = model.blip.visual_encoder(put(pixels))
        text = model.blip.text_encoder(ids, attention_mask=mask, encoder_hidden_states=image,
                                       encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
                                       return_dict=True).last_hidden_state[:, 0, :]
        reward = model.score_gard(ids, mask, put(pixels))
    return {k: t.double().numpy() for k, t in
            {"image_features": image, "text_features": text, "reward": reward}.items()}


def package_model() -> torch.nn.Module:
    """The package's full-size ImageReward(med_config), built on torch's meta device with the real
    constructor (the tokenizer download replaced by nothing: the model's shapes do not need it)."""
    import tempfile

    pkg = load_package()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "med_config.json")
        with open(path, "w") as f:
            json.dump(MED_CONFIG, f)
        saved_tokenizer, saved_linspace = pkg.blip_pretrain.init_tokenizer, torch.linspace
        pkg.blip_pretrain.init_tokenizer = lambda: None
        # VisionTransformer reads its drop-path rates with .item(), which meta tensors refuse
        torch.linspace = lambda *args, **kwargs: saved_linspace(*args, **dict(kwargs, device="cpu"))
        try:
            with torch.device("meta"):
                return pkg.image_reward.ImageReward(med_config=path, device="meta")
        finally:
            pkg.blip_pretrain.init_tokenizer, torch.linspace = saved_tokenizer, saved_linspace


def package_parameter_count() -> int:
    """Parameters of the package's full-size ImageReward(med_config) (package_model)."""
    return sum(p.numel() for p in package_model().parameters())


def write_synthetic_checkpoint(path: str, seed: int = 0) -> int:
    """A full-size ImageReward.pt at `path`: the package's state dict keys, shapes and dtypes
    (package_model: fp32 parameters, the int64 position_ids buffer), finite random values; its
    size in bytes. Never held in memory: torch.save writes the file's layout from fake tensors
    under torch.serialization.skip_data (storages left empty), then each tensor is filled in place
    through torch.load's memory map opened shared, a slice of a random pool at a time."""
    import mmap

    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes = {k: (tuple(v.shape), v.dtype) for k, v in package_model().state_dict().items()}
    with FakeTensorMode():
        fake = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(fake, path)
    del fake
    pool = torch.from_numpy(np.random.default_rng(seed).standard_normal(1 << 20).astype(np.float32) * 0.02)
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
    try:
        tensors = torch.load(path, mmap=True, weights_only=True)
    finally:
        torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
    with torch.no_grad():
        for i, (key, tensor) in enumerate(tensors.items()):
            flat = tensor.view(-1)
            if not tensor.is_floating_point():
                flat.copy_(torch.arange(flat.numel(), dtype=tensor.dtype))     # position_ids
                continue
            start = (i * 7919) % pool.numel()
            for begin in range(0, flat.numel(), pool.numel() - start):
                part = flat[begin:begin + pool.numel() - start]
                part.copy_(pool[start:start + part.numel()])
    del tensors
    return os.path.getsize(path)

"""The HPSv2 reference: the hpsv2 1.2.0 wheel's own open_clip (hpsv2/src/open_clip: the model code,
the transform and the tokenizer hpsv2's img_score uses), imported from the wheel in .deps/hpsv2
(MS_RM_HPSV2_WHEEL_DIR), never installed.

Shims, for what cannot be installed beside the CPU torch, and nothing else:
* torchvision (PyPI's build for torch 2.13 is a CUDA build that breaks the CPU torch): the few
  pieces the wheel's open_clip imports, written from torchvision 0.2x's tensor code paths that
  hpsv2's preprocess_val runs: ToTensor (PIL -> uint8 -> default float dtype / 255), Normalize
  ((x - mean) / std), Compose, and F.resize / F.pad on tensors (torch.nn.functional.interpolate
  bicubic, align_corners=False, antialias=True, the tensor default since torchvision 0.17, the
  input returned as it is when the size does not change; constant zero padding). Resize,
  CenterCrop and RandomResizedCrop (not on hpsv2's val path) and FrozenBatchNorm2d (imported by
  utils.py, unused) are stubs that raise when called.
* the BPE file bpe_simple_vocab_16e6.txt.gz, which the hpsv2 wheel leaves out (its tokenizer
  module reads it at import): copied from the open-clip-torch 3.3.0 wheel in .deps/open-clip.

ftfy (which open_clip's tokenizer imports) is real: installed with `pip install --no-deps --target
.deps/ftfy ftfy==6.3.1` (MS_RM_FTFY_DIR names another folder) and put on sys.path.
"""

from __future__ import annotations

import enum
import glob
import importlib
import os
import sys
import tempfile
import types
import zipfile

FTFY_INSTALL = "pip install --no-deps --target .deps/ftfy ftfy==6.3.1"
PACKAGE = "hpsv2_open_clip"
MEMBER = "hpsv2/src/open_clip/"
_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def _folder(variable: str, name: str) -> str:
    return os.environ.get(variable, os.path.join(_ROOT, ".deps", name))


def ftfy_folder() -> str:
    return _folder("MS_RM_FTFY_DIR", "ftfy")


def _torchvision_shim() -> None:
    """sys.modules entries for the torchvision pieces the wheel's open_clip imports (see the module doc)."""
    import numpy as np
    import torch
    import torch.nn.functional as TF

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    def resize(img, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
        if not isinstance(img, torch.Tensor) or not isinstance(size, (list, tuple)) or len(size) != 2:
            raise NotImplementedError("shim: F.resize of a tensor to an explicit (h, w) only")
        size = [int(s) for s in size]
        if list(img.shape[-2:]) == size:
            return img
        out = TF.interpolate(img[None], size=size, mode=interpolation.value, align_corners=False,
                             antialias=antialias)[0]
        return out

    def pad(img, padding, fill=0, padding_mode="constant"):
        left, top, right, bottom = padding
        return TF.pad(img, (left, right, top, bottom), mode="constant", value=fill)

    class ToTensor:
        def __call__(self, pic):
            img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
            img = img.view(pic.size[1], pic.size[0], len(pic.getbands())).permute((2, 0, 1)).contiguous()
            return img.to(dtype=torch.get_default_dtype()).div(255)

    class Normalize(torch.nn.Module):
        def __init__(self, mean, std, inplace=False):
            super().__init__()
            self.mean, self.std = mean, std

        def forward(self, tensor):
            mean = torch.as_tensor(self.mean, dtype=tensor.dtype)
            std = torch.as_tensor(self.std, dtype=tensor.dtype)
            return (tensor - mean[:, None, None]) / std[:, None, None]

    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

        def __call__(self, img):
            for t in self.transforms:
                img = t(img)
            return img

    class _Stub:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, *args, **kwargs):
            raise NotImplementedError("shim: not on hpsv2's val path")

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops, misc = types.ModuleType("torchvision.ops"), types.ModuleType("torchvision.ops.misc")
    functional.resize, functional.pad = resize, pad
    for name, value in dict(Normalize=Normalize, Compose=Compose, InterpolationMode=InterpolationMode,
                            ToTensor=ToTensor, Resize=_Stub, CenterCrop=_Stub, RandomResizedCrop=_Stub,
                            functional=functional).items():
        setattr(transforms, name, value)
    misc.FrozenBatchNorm2d = _Stub
    ops.misc = misc
    tv.transforms, tv.ops, tv.__shim__ = transforms, ops, True
    sys.modules.update({"torchvision": tv, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional, "torchvision.ops": ops,
                        "torchvision.ops.misc": misc})


def bpe_file(folder: str) -> str:
    """CLIP's BPE file, read out of the open-clip-torch 3.3.0 wheel into `folder`."""
    from .clip_parity import open_clip_bpe

    return open_clip_bpe(folder)


_MODULE = None


def open_clip():
    """The hpsv2 wheel's open_clip package (imported once per process)."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    from .upstream_eval import HPSV2_DOWNLOAD, hpsv2_folder

    wheels = glob.glob(os.path.join(hpsv2_folder(), "hpsv2-1.2.0-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"{hpsv2_folder()}: no hpsv2-1.2.0 wheel; run, in the checkout, {HPSV2_DOWNLOAD}")
    try:                                        # transformers records ftfy's and torchvision's absence first, so its
        import transformers.utils.import_utils  # noqa: F401  (CLIPTokenizer elsewhere in the process is unchanged)
    except ImportError:
        pass
    if not os.path.isdir(os.path.join(ftfy_folder(), "ftfy")):
        try:
            import ftfy  # noqa: F401
        except ImportError:
            raise FileNotFoundError(f"{ftfy_folder()}: no ftfy (open_clip's tokenizer imports it); run, in the "
                                    f"checkout, {FTFY_INSTALL}") from None
    elif ftfy_folder() not in sys.path:
        sys.path.append(ftfy_folder())
    try:
        import torchvision  # noqa: F401
        shimmed = False
    except ImportError:
        _torchvision_shim()
        shimmed = True
    root = tempfile.mkdtemp(prefix="hpsv2-open-clip-")
    target = os.path.join(root, PACKAGE)
    with zipfile.ZipFile(wheels[0]) as wheel:
        for member in wheel.namelist():
            if member.startswith(MEMBER) and not member.endswith("/"):
                path = os.path.join(target, member[len(MEMBER):])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(wheel.read(member))
    bpe = bpe_file(os.path.join(root, "bpe"))
    os.replace(bpe, os.path.join(target, "bpe_simple_vocab_16e6.txt.gz"))
    sys.path.insert(0, root)
    try:
        _MODULE = importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(root)
        if shimmed:                             # the package holds the shim's objects; no one else sees them
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]
    return _MODULE


def open_clip3_files(folder: str):
    """(its tokenize function, its ViT-H-14 model config) from the open-clip-torch 3.3.0 wheel (.deps/open-clip):
    tokenizer.py has no package imports, so it is executed on its own beside the wheel's BPE file."""
    import importlib.util
    import json

    from .clip_parity import open_clip_folder

    wheels = glob.glob(os.path.join(open_clip_folder(), "open_clip_torch-3.3.0-*.whl"))
    if not wheels:
        from .clip_parity import OPEN_CLIP_DOWNLOAD
        raise FileNotFoundError(f"{open_clip_folder()}: no open_clip_torch-3.3.0 wheel; run {OPEN_CLIP_DOWNLOAD}")
    os.makedirs(folder, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as wheel:
        for member in ("open_clip/tokenizer.py", "open_clip/bpe_simple_vocab_16e6.txt.gz"):
            with open(os.path.join(folder, os.path.basename(member)), "wb") as f:
                f.write(wheel.read(member))
        config = json.loads(wheel.read("open_clip/model_configs/ViT-H-14.json"))
    open_clip()                                 # ftfy on the path, after transformers has looked for it
    spec = importlib.util.spec_from_file_location("open_clip3_tokenizer", os.path.join(folder, "tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tokenize, config


def img_score_function(model, preprocess_val, root: str):
    """hpsv2's own `img_score.score(img_path, prompt, cp=...)`, executed from the wheel's source, with its
    model_dict filled with `model` and `preprocess_val` (so initialize_model, which would download the
    laion2B ViT-H-14 weights, does nothing) and `root` as its cache folder. The modules it imports that
    are not the wheel's open_clip (hpsv2.utils' root_path / hps_version_map, clint's progress bar,
    requests, huggingface_hub: used only to download) are stubs for the call."""
    from .upstream_eval import hpsv2_folder

    oc = open_clip()
    wheel = glob.glob(os.path.join(hpsv2_folder(), "hpsv2-1.2.0-*.whl"))[0]
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read("hpsv2/img_score.py").decode("utf-8")
    stubs = {name: types.ModuleType(name) for name in ("hpsv2", "hpsv2.src", "hpsv2.utils", "clint", "clint.textui",
                                                      "requests", "huggingface_hub")}
    stubs["hpsv2.utils"].root_path, stubs["hpsv2.utils"].hps_version_map = root, {}
    stubs["clint.textui"].progress = None
    stubs["hpsv2.src.open_clip"] = oc
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        namespace = {"__name__": "hpsv2_img_score"}
        exec(compile(source, f"{wheel}/hpsv2/img_score.py", "exec"), namespace)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    namespace["model_dict"].update(model=model, preprocess_val=preprocess_val)
    return namespace["score"]

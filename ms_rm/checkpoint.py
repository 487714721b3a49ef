"""Our converted checkpoint directory: written from a ConversionPlan, loaded strictly.

    OUT/
      ms_rm_config.json   the model config (format ms_rm.diffusion_rm, version 1): backbone
                          dimensions, cut, taps, head, scheduler shift, add_noise, u convention
      model.safetensors   every parameter, named as DiffusionRM names it
      manifest.json       source files with sha256; every tensor's shape, dtype, CRC32, origin and
                          LoRA merge; the source keys not used and why; converter version; the
                          sha256 of the two files above

Loading always checks every tensor's CRC32 as it is read (3.7 GB/s: a corrupted or mixed-up
file cannot load silently); verify=True also checks the two files' sha256 (0.3 GB/s).

The directory is assembled in a hidden sibling folder and renamed into place at the end, so an
interrupted or failed conversion leaves no output; an existing output is replaced only with
force=True, and never when it holds one of the sources.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zlib
from typing import Optional

import numpy as np

import mindspore as ms
from tqdm import tqdm

from . import __version__
from .config import FORMAT_NAME, FORMAT_VERSION, load_config
from .convert import ConversionPlan, open_reference
from .errors import CheckpointError
from .safetensors_io import DTYPE_NAMES, SafetensorsFile, SafetensorsWriter, sha256_file
from .weights import load_parameters

logger = logging.getLogger(__name__)

CONFIG_FILE = "ms_rm_config.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


def _write_json(path: str, obj) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return sha256_file(path)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=None if enabled else True, leave=False)


def convert(src: str, transformer: str, scheduler: str, out: str, config: Optional[str] = None,
            dtype: str = "keep", u_convention: str = "sigma", force: bool = False,
            progress: bool = True) -> str:
    """Convert a reference checkpoint into a MindSpore checkpoint directory `out`; returns its path."""
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out) and not force:
        raise CheckpointError(f"{out}: already exists; pass --force (force=True) to replace it")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise CheckpointError(f"{out}: exists and is not a directory")
    sources = open_reference(src, transformer, scheduler, config)
    try:
        plan = ConversionPlan.build(sources, u_convention)
        plan.out_dtype(plan.tensors[0], dtype)                 # validates dtype before any work
        inside = [f for f in sources.files() if _inside(f, out)]
        if inside:
            raise CheckpointError(f"{out}: holds source file {inside[0]}; choose an output folder "
                                  "outside the sources")
        for label, keys in plan.unused.items():
            logger.info("%s: %d tensors not used (%s)", label, len(keys), sorted(set(keys.values()))[0]
                        if len(set(keys.values())) == 1 else "see manifest.json")
        for note in plan.notes:
            logger.info("%s", note)
        parent = os.path.dirname(out)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
        try:
            _write(plan, sources, staging, dtype, progress)
            _replace(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        sources.close()
    logger.info("wrote %s", out)
    return out


def _write(plan: ConversionPlan, sources, folder: str, dtype: str, progress: bool) -> None:
    files = sources.files()
    hashes = {}
    with _bar(sum(os.path.getsize(f) for f in files), "hashing sources", progress) as bar:
        for f in files:
            hashes[f] = {"sha256": sha256_file(f, bar.update), "bytes": os.path.getsize(f)}
    specs = [(t.name, plan.out_dtype(t, dtype), t.shape) for t in plan.tensors]
    writer = SafetensorsWriter(os.path.join(folder, WEIGHTS_FILE), specs, {"format": FORMAT_NAME})
    tensors = {}
    with _bar(plan.nbytes(dtype), "converting", progress) as bar:
        for t, (_, out_dtype, _) in zip(plan.tensors, specs):
            array = plan.tensor(t.name, dtype)
            writer.write(t.name, array)
            tensors[t.name] = dict(t.describe(), dtype=DTYPE_NAMES[out_dtype], crc32=crc32(array))
            bar.update(array.nbytes)
    weights_sha = writer.close()
    config_sha = _write_json(os.path.join(folder, CONFIG_FILE), plan.config.to_dict())
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "converter": {"name": "ms_rm", "version": __version__},
        "mode": sources.mode, "dtype": dtype, "u_convention": plan.config.u_convention,
        "sources": {os.path.abspath(f): h for f, h in hashes.items()},
        "files": {WEIGHTS_FILE: {"sha256": weights_sha, "bytes": os.path.getsize(os.path.join(folder, WEIGHTS_FILE))},
                  CONFIG_FILE: {"sha256": config_sha}},
        "lora": None if sources.lora is None else {
            "adapter_config": os.path.abspath(sources.lora.config_path),
            "merged_modules": sum(t.lora is not None for t in plan.tensors),
            "merge": "W + scale * B @ A in float32 (MindSpore), then cast to the output dtype"},
        "notes": plan.notes,
        "tensors": tensors,
        "unused": plan.unused,
    }
    _write_json(os.path.join(folder, MANIFEST_FILE), manifest)


def _replace(staging: str, out: str) -> None:
    if not os.path.lexists(out):
        os.rename(staging, out)
        return
    backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
    os.rmdir(backup)
    os.rename(out, backup)               # until the new folder is in place, the old one survives
    os.rename(staging, out)
    shutil.rmtree(backup, ignore_errors=True)


def read_manifest(path: str) -> dict:
    manifest_path = os.path.join(path, MANIFEST_FILE)
    try:
        with open(manifest_path, "r", encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST_FILE}; is this a folder written by ms-rm convert?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{manifest_path}: not an ms_rm manifest")
    if not isinstance(manifest.get("tensors"), dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path}: lacks 'tensors' or 'files'")
    return manifest


def verify_files(path: str, manifest: dict) -> None:
    """CheckpointError unless the weights and config files match the manifest's sha256."""
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        entry = manifest["files"].get(name)
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise CheckpointError(f"{path}/{MANIFEST_FILE}: no sha256 recorded for {name}")
        actual = sha256_file(os.path.join(path, name))
        if actual != entry["sha256"]:
            raise CheckpointError(f"{path}/{name}: sha256 {actual[:16]}... does not match the manifest "
                                  f"({entry['sha256'][:16]}...): the file was modified or corrupted")


def load_pretrained(path: str, dtype: ms.Type = ms.float32, mode: str = "graph", verify: bool = False):
    """A DiffusionRM from a converted checkpoint directory, every parameter filled strictly."""
    from .model import DiffusionRM

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected a folder written by ms-rm convert)")
    manifest = read_manifest(path)
    config = load_config(os.path.join(path, CONFIG_FILE))
    if verify:
        verify_files(path, manifest)
    weights_path = os.path.join(path, WEIGHTS_FILE)
    with SafetensorsFile(weights_path) as weights:
        listed = manifest["tensors"]
        if set(listed) != set(weights.keys()):
            raise CheckpointError(f"{weights_path}: its tensors differ from those {MANIFEST_FILE} lists "
                                  "(files from different conversions?)")
        for name in weights.keys():
            entry = listed.get(name)
            if not isinstance(entry, dict) or entry.get("shape") != list(weights.shape(name)) \
                    or entry.get("dtype") != DTYPE_NAMES[weights.dtype(name)]:
                raise CheckpointError(f"{weights_path}: tensor '{name}' does not match {MANIFEST_FILE} "
                                      "(files from different conversions?)")
        model = DiffusionRM(config, dtype=dtype, mode=mode)

        def read_checked(name: str):
            array = weights.read(name)
            if crc32(array) != listed[name].get("crc32"):
                raise CheckpointError(f"{weights_path}: tensor '{name}' fails its CRC32 check against "
                                      f"{MANIFEST_FILE}: the file was modified or corrupted; convert again")
            return array

        load_parameters(model, read_checked, weights.keys(), weights_path)
    return model


def crc32(array) -> int:
    """CRC32 of an array's bytes (as stored)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))

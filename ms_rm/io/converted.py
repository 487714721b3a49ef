"""ms_rm's converted checkpoint folder, for any reward model: written atomically, read strictly.

    OUT/
      ms_rm_config.json   the model's config, in the reward model's own format (its "format" key
                          names the reward model, e.g. ms_rm.diffusion_rm)
      model.safetensors   every parameter, named as the MindSpore model names it
      manifest.json       format and version; converter version; source files with sha256; every
                          tensor's shape, dtype, CRC32 and origin; the source keys not used and
                          why; the sha256 of the two files above; model-specific facts

Reading (`ConvertedFolder`) checks, on every load: the manifest; the config file's sha256
against the manifest (a config edited after conversion would silently change the model's
meaning: its noise mapping, its shift); that the weights file lists exactly the manifest's
tensors with their shapes and dtypes; and every tensor's CRC32 as it is read. verify=True
also checks the weights file's sha256.

Writing (`write_converted`) assembles the folder in a hidden sibling and renames it into place
(ms_rm.io.files.atomic_folder): an interrupted or failed conversion leaves no output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from ..core.errors import CheckpointError
from ..version import __version__
from .files import atomic_folder, is_inside, read_json, write_json
from .safetensors_file import DTYPE_NAMES, SafetensorsFile, SafetensorsWriter, sha256_file

logger = logging.getLogger(__name__)

CONFIG_FILE = "ms_rm_config.json"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"

TensorSpec = Tuple[str, np.dtype, Tuple[int, ...]]       # name, stored dtype, shape


def crc32(array) -> int:
    """CRC32 of an array's bytes (as stored)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))


def progress_bar(total: int, desc: str, enabled: bool):
    """A byte-counting progress bar (shown on a terminal only, and only when enabled)."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=None if enabled else True, leave=False)


# --- writing -------------------------------------------------------------------------------------

def refuse_source_inside(out: str, sources: Sequence[str]) -> None:
    """CheckpointError if the output folder would hold (and so replace) one of the sources."""
    inside = [f for f in sources if is_inside(f, out)]
    if inside:
        raise CheckpointError(f"{out}: holds source file {inside[0]}; choose an output folder outside the sources")


def write_converted(out: str, *, config: Mapping, specs: Sequence[TensorSpec],
                    produce: Callable[[str], np.ndarray], describe: Callable[[str], dict],
                    sources: Sequence[str], manifest: Mapping, force: bool = False,
                    progress: bool = True) -> str:
    """Write a converted folder `out` atomically; returns its absolute path.

    config: the model's config dict (its "format" and "format_version" head the manifest);
    specs: the tensors in file order; produce(name): each tensor's array, in its spec's dtype;
    describe(name): its manifest entry (origin, LoRA merge, ...); sources: every file read;
    manifest: the model-specific manifest entries (mode, dtype, notes, unused keys, ...)."""
    out = os.path.abspath(os.fspath(out))
    refuse_source_inside(out, sources)
    with atomic_folder(out, force) as folder:
        hashes = {}
        with progress_bar(sum(os.path.getsize(f) for f in sources), "hashing sources", progress) as bar:
            for f in sources:
                hashes[os.path.abspath(f)] = {"sha256": sha256_file(f, bar.update), "bytes": os.path.getsize(f)}
        weights_path = os.path.join(folder, WEIGHTS_FILE)
        writer = SafetensorsWriter(weights_path, specs, {"format": config["format"]})
        tensors: Dict[str, dict] = {}
        total = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for _, dtype, shape in specs)
        with progress_bar(total, "converting", progress) as bar:
            for name, dtype, _ in specs:
                array = produce(name)
                writer.write(name, array)
                tensors[name] = dict(describe(name), dtype=DTYPE_NAMES[np.dtype(dtype)], crc32=crc32(array))
                bar.update(array.nbytes)
        weights_sha = writer.close()
        config_path = os.path.join(folder, CONFIG_FILE)
        write_json(config_path, dict(config))
        write_json(os.path.join(folder, MANIFEST_FILE), {
            "format": config["format"], "format_version": config["format_version"],
            "converter": {"name": "ms_rm", "version": __version__},
            **manifest,
            "sources": hashes,
            "files": {WEIGHTS_FILE: {"sha256": weights_sha, "bytes": os.path.getsize(weights_path)},
                      CONFIG_FILE: {"sha256": sha256_file(config_path)}},
            "tensors": tensors,
        })
    logger.info("wrote %s", out)
    return out


# --- reading -------------------------------------------------------------------------------------

def read_manifest(path: str) -> dict:
    """The manifest of converted folder `path`, with its required entries checked."""
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{path}: no {MANIFEST_FILE}; is this a folder written by ms-rm convert?")
    manifest = read_json(manifest_path, "manifest", CheckpointError)
    if not isinstance(manifest.get("format"), str) or not manifest["format"].startswith("ms_rm."):
        raise CheckpointError(f"{manifest_path}: not an ms_rm manifest")
    if not isinstance(manifest.get("tensors"), dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path}: lacks 'tensors' or 'files'")
    return manifest


def _recorded_sha256(path: str, manifest: dict, name: str) -> str:
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise CheckpointError(f"{os.path.join(path, MANIFEST_FILE)}: no sha256 recorded for {name}")
    return entry["sha256"]


class ConvertedFolder:
    """A converted folder opened for loading: manifest, config (checked against its sha256), and
    the weights, read one tensor at a time with its CRC32 checked."""

    def __init__(self, path: str, verify: bool = False):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: not a directory (expected a folder written by ms-rm convert)")
        self.manifest = read_manifest(self.path)
        self.format: str = self.manifest["format"]
        self.config_path = os.path.join(self.path, CONFIG_FILE)
        self.weights_path = os.path.join(self.path, WEIGHTS_FILE)
        if not os.path.isfile(self.config_path):
            raise CheckpointError(f"{self.path}: no {CONFIG_FILE}; convert again")
        with open(self.config_path, "rb") as f:       # hashed and parsed from the same bytes
            config_bytes = f.read()
        recorded = _recorded_sha256(self.path, self.manifest, CONFIG_FILE)
        if hashlib.sha256(config_bytes).hexdigest() != recorded:
            raise CheckpointError(f"{self.config_path}: edited after conversion (its sha256 does not match "
                                  f"{MANIFEST_FILE}); a converted config is not to be changed by hand: convert "
                                  "again with the settings you want (e.g. --u-convention)")
        if verify:
            expected = _recorded_sha256(self.path, self.manifest, WEIGHTS_FILE)
            actual = sha256_file(self.weights_path)
            if actual != expected:
                raise CheckpointError(f"{self.weights_path}: sha256 {actual[:16]}... does not match the manifest "
                                      f"({expected[:16]}...): the file was modified or corrupted")
        try:
            self.config = json.loads(config_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.config_path}: cannot read the converted config ({e})") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{self.config_path}: the converted config must hold a JSON object")
        self._weights = SafetensorsFile(self.weights_path)
        try:
            self._check_listing()
        except BaseException:
            self._weights.close()
            raise

    def _check_listing(self) -> None:
        listed = self.manifest["tensors"]
        if set(listed) != set(self._weights.keys()):
            raise CheckpointError(f"{self.weights_path}: its tensors differ from those {MANIFEST_FILE} lists "
                                  "(files from different conversions?)")
        for name in self._weights.keys():
            entry = listed[name]
            if not isinstance(entry, dict) or entry.get("shape") != list(self._weights.shape(name)) \
                    or entry.get("dtype") != DTYPE_NAMES[self._weights.dtype(name)]:
                raise CheckpointError(f"{self.weights_path}: tensor '{name}' does not match {MANIFEST_FILE} "
                                      "(files from different conversions?)")

    def expect_format(self, format_name: str) -> None:
        """CheckpointError unless the folder holds a model of `format_name`."""
        if self.format != format_name:
            raise CheckpointError(f"{self.path}: holds a '{self.format}' model, not '{format_name}'")

    @property
    def names(self) -> List[str]:
        return self._weights.keys()

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as stored, after checking its CRC32 against the manifest."""
        array = self._weights.read(name)
        if crc32(array) != self.manifest["tensors"][name].get("crc32"):
            raise CheckpointError(f"{self.weights_path}: tensor '{name}' fails its CRC32 check against "
                                  f"{MANIFEST_FILE}: the file was modified or corrupted; convert again")
        return array

    def close(self) -> None:
        self._weights.close()

    def __enter__(self) -> "ConvertedFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def manifest_format(path: str) -> str:
    """The reward-model format a converted folder holds (its manifest's "format")."""
    return read_manifest(os.fspath(path))["format"]

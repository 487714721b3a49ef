"""Compiled graphs kept across processes: MindSpore's compilation cache, used only where it is safe.

What MindSpore's cache does (measured with mindspore 2.10 on the CPU): with
`set_context(enable_compile_cache=True, compile_cache_path=DIR)` a process stores its i-th compiled
graph as DIR/rank_R/graph_cache/compile_cache_i.mindir, and a later process loads file i for its
own i-th compile without comparing the graphs: only the hash of the Python sources is checked.
A process that compiles other shapes, or other models, in another order gets another graph (a run
at batch 3 after one at batch 2 failed in ExpandDims). The path is read once, at the first compile;
`enable_compile_cache` is read at every compile. Weights are not in the cache (a model with other
weights gives the numbers of an uncached run).

What ms_rm adds, so that a cached graph is only ever one compiled from the same thing:
* every graph ms_rm compiles goes through `jit` below, which knows when a call compiles and
  describes that graph by a signature: the owner cells (class, plain attributes, configs, every
  parameter's name, shape and dtype), the method and its arguments' shapes, dtypes and values;
* the cache directory of a process is chosen at its first compile, from MindSpore's and mindone's
  versions, ms_rm's sources (MindSpore's own source hash leaves out installed packages, ms_rm
  included) and the signature of that first graph: ROOT/<hash>;
* that directory holds the list of the signatures compiled in it, in order (ms_rm_graphs.json).
  The i-th compile of a process must have the i-th recorded signature; at the first one that
  differs the cache is turned off for the rest of the process, which then compiles as without it.

So a cache is safe in a process whose graphs are all compiled by ms_rm (the `ms-rm` commands). In a
process that compiles graphs of its own (a trainer's `ms.jit`), leave it off: MindSpore would
count those graphs too. Turn it on with `use_compile_cache(root)` before the first compile, or
with `MS_RM_COMPILE_CACHE=ROOT` in the environment: the `ms-rm` command reads it for its
--compile-cache default, and a process that never calls `use_compile_cache` (a notebook, a script
over the library) reads it at its first ms_rm compile. `use_compile_cache(None)` keeps the cache
off whatever the environment says.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Callable, List, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from ..version import __version__

logger = logging.getLogger(__name__)

MANIFEST = "ms_rm_graphs.json"


class _Cache:
    """The process's compilation cache: its root, and once the first graph compiles, its directory."""

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.directory: Optional[str] = None
        self.recorded: List[str] = []          # the signatures compiled in `directory`, in order
        self.compiles = 0                      # graphs this process compiled so far
        self.reused = 0                        # of which MindSpore took from the cache
        self.active = True

    def before_compile(self, signature: str) -> None:
        """Called right before MindSpore compiles the graph `signature`."""
        if not self.active:
            return
        if self.directory is None:
            if not _entry_script_scannable():
                logger.warning("compilation cache off: MindSpore hashes the entry script and the files it imports, "
                               "and cannot read this process's (python -m, or relative imports in the script); "
                               "run the ms-rm command or a .py script")
                self.active = False
                return
            key = _digest(f"{_code_versions()}\n{_rank()}\n{signature}")
            self.directory = os.path.join(self.root, key[:20])
            os.makedirs(self.directory, exist_ok=True)
            recorded = _read_manifest(os.path.join(self.directory, MANIFEST))
            if recorded is None:              # graphs whose signatures are unknown: never load them
                logger.warning("compilation cache %s: its %s is unreadable; compiling without the cache (delete "
                               "the folder to rebuild it)", self.directory, MANIFEST)
                self.active = False
                return
            self.recorded = recorded
            ms.set_context(enable_compile_cache=True, compile_cache_path=self.directory)
            logger.debug("compilation cache: %s (%d graphs recorded)", self.directory, len(self.recorded))
        index, self.compiles = self.compiles, self.compiles + 1
        if index < len(self.recorded):
            if self.recorded[index] != signature:
                self.active = False
                ms.set_context(enable_compile_cache=False)
                logger.info("compilation cache %s holds other graphs from graph %d on: compiling without it",
                            self.directory, index)
            else:
                self.reused += 1
            return
        self.recorded.append(signature)
        _write_manifest(os.path.join(self.directory, MANIFEST), self.recorded)


_cache: Optional[_Cache] = None
_configured = False                            # use_compile_cache called (else MS_RM_COMPILE_CACHE decides)
_graphs_compiled = 0                           # by `jit` in this process, with or without a cache
ENVIRONMENT = "MS_RM_COMPILE_CACHE"


def use_compile_cache(root: Optional[str]) -> None:
    """Keep compiled graphs under `root` for later processes (None: no cache). Call it before the
    process compiles its first graph; see the module notes for where a cache is safe."""
    global _cache, _configured
    if root and _graphs_compiled:
        raise RuntimeError(f"use_compile_cache must be called before the first graph is compiled; this process "
                           f"compiled {_graphs_compiled} already")
    if not root and _cache is not None and _cache.directory is not None:
        ms.set_context(enable_compile_cache=False)      # a cache the environment turned on: MindSpore's too
    _cache = _Cache(root) if root else None
    _configured = True


def _cache_from_environment() -> None:
    """At the first compile of a process that did not call use_compile_cache: $MS_RM_COMPILE_CACHE."""
    root = os.environ.get(ENVIRONMENT)
    if root:
        logger.info("compilation cache under %s (%s)", root, ENVIRONMENT)
    use_compile_cache(root or None)


def compile_cache_status() -> dict:
    """directory (None before the first compile or without a cache), graphs compiled, of which
    reused from the cache, and whether the cache is still in use."""
    if _cache is None:
        return {"directory": None, "compiled": 0, "reused": 0, "active": False}
    return {"directory": _cache.directory, "compiled": _cache.compiles, "reused": _cache.reused,
            "active": _cache.active}


class jit:
    """`ms.jit(function)` that tells the compilation cache which graph each new input signature
    compiles. owners: the cells (or objects holding them) whose parameters and settings the graph
    reads; name: what the function computes (a method name)."""

    def __init__(self, function: Callable, *owners: Any, name: str):
        self.compiled = ms.jit(function)
        self.owners, self.name = owners, name
        self._owner_key: Optional[str] = None
        self._seen: set = set()                # argument signatures compiled so far

    def __call__(self, *args):
        global _graphs_compiled
        arguments = describe(args)
        if arguments not in self._seen:                # this call compiles
            self._seen.add(arguments)
            if not _configured:
                _cache_from_environment()
            _graphs_compiled += 1
            if _cache is not None:
                if self._owner_key is None:
                    self._owner_key = "\n".join(fingerprint(owner) for owner in self.owners)
                _cache.before_compile(_digest(f"{self._owner_key}\n{self.name}\n{arguments}"))
        return self.compiled(*args)


def describe(value: Any) -> str:
    """What of a value a compiled graph depends on: tensors by shape and dtype, arrays held as
    constants by content, plain values by repr."""
    if isinstance(value, Tensor):
        return f"T{tuple(value.shape)}{value.dtype}"
    if isinstance(value, np.ndarray):
        return f"A{value.shape}{value.dtype}{_digest(value.tobytes())}"
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(describe(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k!r}:{describe(v)}" for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str, ms.Type)):
        return repr(value)
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def fingerprint(owner: Any) -> str:
    """The structure of a cell: every sub-cell's class and public attributes (configs, sizes,
    constant tables), every parameter's name, shape and dtype. Of another object (a loss holding
    models): its class, its cells' fingerprints and its other attributes."""
    if not isinstance(owner, nn.Cell):
        parts = [f"{type(owner).__module__}.{type(owner).__qualname__}"]
        for key, value in sorted(vars(owner).items()):
            parts.append(f"{key}:{fingerprint(value) if isinstance(value, nn.Cell) else describe(value)}")
        return _digest("\n".join(parts))
    parts = []
    for name, sub in owner.cells_and_names():
        attributes = {k: v for k, v in vars(sub).items()
                      if not k.startswith("_") and not isinstance(v, (nn.Cell, Callable))}
        parts.append(f"{name}:{type(sub).__module__}.{type(sub).__qualname__}:{describe(attributes)}")
        for key, value in vars(sub).items():           # constant tensors a graph reads
            if isinstance(value, Tensor) and not isinstance(value, ms.Parameter):
                parts.append(f"{name}.{key}:{describe(value.asnumpy())}")
    parts += [f"{p.name}{tuple(p.shape)}{p.dtype}" for p in owner.get_parameters()]
    return _digest("\n".join(parts))


def _digest(text) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def _code_versions() -> str:
    """What the graphs are compiled from: MindSpore's and mindone's versions and ms_rm's own sources
    (MindSpore hashes only the sources outside installed packages, which ms_rm's are not)."""
    from importlib import metadata

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = hashlib.sha256()
    for folder, _, files in sorted(os.walk(package)):
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    sources.update(name.encode() + f.read())
    try:
        mindone = metadata.version("mindone")
    except metadata.PackageNotFoundError:
        mindone = None
    return f"mindspore {ms.__version__}\nmindone {mindone}\nms_rm {__version__} {sources.hexdigest()}"


def _entry_script_scannable() -> bool:
    """Whether MindSpore can hash the entry script's dependencies (it fails at the compile otherwise)."""
    try:
        from mindspore.graph import api

        api._get_compile_cache_dep_files()
    except Exception:             # FileNotFoundError for "-m", ImportError for relative imports
        return False
    return True


def _rank() -> str:
    return os.environ.get("MS_NODE_ID") or os.environ.get("RANK_ID") or "0"


def _read_manifest(path: str) -> Optional[List[str]]:
    """The recorded signatures; [] for a new folder, None when the folder holds graphs without a
    readable list."""
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except FileNotFoundError:
        return None if any(files for _, _, files in os.walk(os.path.dirname(path))) else []
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, list) and all(isinstance(s, str) for s in recorded) else None


def _write_manifest(path: str, recorded: List[str]) -> None:
    """Write the list atomically (a temporary file renamed over it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", dir=os.path.dirname(path))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(recorded, f)
    os.replace(tmp, path)

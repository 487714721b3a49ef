"""Files: reading JSON / YAML with errors that name the file, finding weights files, and
writing outputs atomically.

Every output ms_rm writes (a converted folder, a scores file, an .npz) is assembled beside its
final path under a hidden name and renamed into place, so an interrupted or failed run leaves
no partial output and never a half-replaced one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import IO, Iterator, Sequence, Type, Union

from ..core.errors import CheckpointError, ConfigError, MsRmError

PathLike = Union[str, os.PathLike]


# --- reading --------------------------------------------------------------------------------------

def read_text(path: PathLike, what: str, error: Type[MsRmError] = ConfigError) -> str:
    """The UTF-8 text of `path`; `error` naming the file and `what` it should be otherwise."""
    path = os.fspath(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read the {what} ({e})") from None


def read_json(path: PathLike, what: str = "JSON file", error: Type[MsRmError] = ConfigError) -> dict:
    """A JSON object from `path`; `error` (naming the file and `what` it should be) otherwise."""
    path = os.fspath(path)
    text = read_text(path, what, error)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: cannot read the {what} ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: the {what} must hold a JSON object, got {type(data).__name__}")
    return data


def read_config_file(path: PathLike) -> dict:
    """A JSON or YAML config file as a dict (YAML only for files not named .json: the reference
    also dumps its training YAML); ConfigError names the file on any problem."""
    path = os.fspath(path)
    text = read_text(path, "config file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as json_error:
        if path.endswith(".json"):
            raise ConfigError(f"{path}: invalid JSON ({json_error})") from None
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: neither valid JSON nor YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def find_weights(folder: PathLike, names: Sequence[str], what: str) -> str:
    """The first of `names` (e.g. a sharded index, then the single file) present in `folder`.

    CheckpointError otherwise, naming the files looked for and `what` the folder should hold,
    and, when it holds weights in another format (.bin, .pt, .ckpt pickles), how to re-save them."""
    folder = os.fspath(folder)
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    others = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin", ".ckpt", ".pt")))
    hint = (f" (found {others}: re-save it with save_pretrained(..., safe_serialization=True))"
            if others else "")
    raise CheckpointError(f"{folder}: no {' or '.join(names)}; expected {what}{hint}")


def is_inside(path: PathLike, folder: PathLike) -> bool:
    """Whether `path` is `folder` or lies under it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# --- writing atomically -----------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a hidden temporary file beside `path` for writing; on success it is flushed to disk
    and renamed to `path`, on any failure removed."""
    path = os.path.abspath(os.fspath(path))
    binary = "b" in mode
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.partial-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: PathLike, obj) -> None:
    """`obj` as indented JSON, written atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def check_new_output(out: PathLike, force: bool = False) -> str:
    """`out` as an absolute path, if it may be written: absent, or a folder to replace with force."""
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out) and not force:
        raise CheckpointError(f"{out}: already exists; pass --force (force=True) to replace it")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise CheckpointError(f"{out}: exists and is not a directory")
    return out


@contextlib.contextmanager
def atomic_folder(out: PathLike, force: bool = False) -> Iterator[str]:
    """A hidden staging folder beside `out`, renamed to `out` when the block succeeds.

    An existing `out` is refused unless `force`; with force it survives until the new folder is
    in place. On failure the staging folder is removed and `out` is left as it was."""
    out = check_new_output(out, force)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        yield staging
        if not os.path.lexists(out):
            os.rename(staging, out)
            return
        backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
        os.rmdir(backup)
        os.rename(out, backup)               # until the new folder is in place, the old one survives
        os.rename(staging, out)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

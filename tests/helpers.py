"""Test setup shared by the test files: tiny reference checkpoints and their conversions, and the
import of an optional install extra."""

import importlib
import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys

import pytest

from ms_rm import DiffusionRM
from ms_rm_parity.cases import Case
from ms_rm_parity.harness import save_case_reference


def reference_checkpoint(root, case: Case = None, seed: int = 0, **case_fields):
    """A tiny random reference checkpoint of `case` (default: Case("t", "", **case_fields)) saved
    under `root` as the reference saves it; its ReferencePaths (src, transformer, scheduler)."""
    return save_case_reference(case or Case("t", "", **case_fields), str(root), seed)


def converted_checkpoint(root, case: Case = None, seed: int = 0, **case_fields):
    """reference_checkpoint under root/reference, converted by ms-rm convert into root/converted:
    (its ReferencePaths, the converted folder)."""
    paths = reference_checkpoint(os.path.join(str(root), "reference"), case, seed, **case_fields)
    out = DiffusionRM.convert(paths.src, paths.transformer, paths.scheduler, os.path.join(str(root), "converted"),
                              progress=False)
    return paths, out


def import_extra(module: str, distribution: str, extra: str):
    """Import `module`, which comes with the install extra `extra` (distribution `distribution`).

    The tests that need it are skipped only when that distribution is not installed at all, and
    never under CI (which installs every extra). When it is installed, any import failure (a
    missing or broken dependency) fails the test run instead of skipping it silently."""
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        message = f"{distribution} is not installed (pip install 'ms-rm[{extra}]')"
        if os.environ.get("CI"):
            pytest.fail(f"{message}, and CI installs every extra", pytrace=False)
        pytest.skip(message, allow_module_level=True)
    return importlib.import_module(module)


# --- msrun jobs (tests of runs across workers) -------------------------------------------------------
WORKERS = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun(script, *args, log_dir, timeout=600):
    """Run `script args` as an msrun job of WORKERS CPU workers; (returncode, the workers' logs)."""
    launcher = shutil.which("msrun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert launcher, "msrun (installed with mindspore) is not on PATH"
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           # the checkout under test first, whichever checkout the installed ms-rm points at
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    env.pop("MS_ROLE", None)
    command = [launcher, f"--worker_num={WORKERS}", f"--local_worker_num={WORKERS}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "--join=True", f"--log_dir={log_dir}", str(script), *map(str, args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    logs = "".join(open(os.path.join(log_dir, f)).read() for f in sorted(os.listdir(log_dir)) if f.startswith("worker"))
    return done.returncode, logs


def ms_rm_command() -> str:
    """The installed ms-rm command (a Python script msrun can run)."""
    path = shutil.which("ms-rm", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert path, "the ms-rm command is not installed (pip install -e .)"
    return path

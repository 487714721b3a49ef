"""Hardening: fuzzed checkpoint inputs, foreign code, absurd headers, determinism.

Fuzzing (hypothesis, derandomized so CI is repeatable): FUZZ_EXAMPLES mutated inputs per
target, each mutation one of: a byte flipped, a run of bytes overwritten, the file cut short, a
safetensors header entry or a JSON config value replaced by a hostile value. On the loader
(from_pretrained of a converted folder) and on the converter (reference files) only ms_rm's own
errors may escape; a load that succeeds must hold exactly the original weights; a failed
conversion leaves no output. The two fuzz tests together take about 2 minutes on 2 CPU cores.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ms_rm import DiffusionRM, InputError, MsRmError
from ms_rm.io.safetensors_file import SafetensorsFile

from helpers import converted_checkpoint

FUZZ_EXAMPLES = int(os.environ.get("MS_RM_FUZZ_EXAMPLES", 60))    # raise it for a longer campaign
HOSTILE = [None, True, -1, 0, 2 ** 63, 1e308, float("nan"), "x", "", [], [1, -1], [2 ** 40, 2 ** 40], {}, {"a": 1}]


class Pristine(tuple):
    def __repr__(self):
        return "Pristine(reference checkpoint, its conversion, its weights)"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    paths, out = converted_checkpoint(tmp_path_factory.mktemp("pristine"), seed=2, shard_size="100KB")
    weights = {p.name: p.asnumpy() for p in DiffusionRM.from_pretrained(out).get_parameters()}
    return Pristine((paths, out, weights))


def _files(folder):
    return sorted(os.path.relpath(os.path.join(b, f), folder) for b, _, fs in os.walk(folder) for f in fs)


def _mutate_bytes(data: bytes, kind: str, position: float, value: int, length: int) -> bytes:
    if not data:
        return data
    at = min(int(position * len(data)), len(data) - 1)
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ (1 << (value % 8))]) + data[at + 1:]
    if kind == "overwrite":
        return data[:at] + bytes([value % 256]) * length + data[at + length:]
    return data[:at]                                                          # truncate


def _mutate_json(data: dict, path_choice: int, value) -> dict:
    """Replace one (nested) value of a JSON object by a hostile one."""
    leaves = []

    def walk(node, trail):
        if isinstance(node, dict):
            for key, child in node.items():
                leaves.append(trail + [key])
                walk(child, trail + [key])

    walk(data, [])
    if not leaves:
        return data
    trail = leaves[path_choice % len(leaves)]
    node = data
    for key in trail[:-1]:
        node = node[key]
    node[trail[-1]] = value
    return data


def _mutate_safetensors_header(data: bytes, entry_choice: int, field: int, value) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    names = sorted(header)
    name = names[entry_choice % len(names)]
    if name == "__metadata__":
        header[name] = value
    else:
        header[name][("dtype", "shape", "data_offsets")[field % 3]] = value
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


mutation = st.one_of(
    st.tuples(st.just("bytes"), st.sampled_from(["flip", "overwrite", "truncate"]), st.floats(0, 1),
              st.integers(0, 255), st.integers(1, 64)),
    st.tuples(st.just("json"), st.integers(0, 10 ** 6), st.sampled_from(HOSTILE)),
    st.tuples(st.just("header"), st.integers(0, 10 ** 6), st.integers(0, 2), st.sampled_from(HOSTILE)),
)


def _apply(path: str, m) -> bool:
    """Mutate the file in place; False when the mutation does not apply to this file type."""
    data = open(path, "rb").read()
    if m[0] == "bytes":
        new = _mutate_bytes(data, *m[1:])
    elif m[0] == "json":
        if not path.endswith(".json"):
            return False
        new = json.dumps(_mutate_json(json.loads(data), *m[1:])).encode()
    else:
        if not path.endswith(".safetensors"):
            return False
        new = _mutate_safetensors_header(data, *m[1:])
    open(path, "wb").write(new)
    return True


FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                derandomize=os.environ.get("MS_RM_FUZZ_RANDOM") is None)


@FUZZ
@given(target=st.sampled_from(["model.safetensors", "manifest.json", "ms_rm_config.json"]), m=mutation)
def test_fuzz_loading_a_converted_checkpoint(pristine, tmp_path_factory, target, m):
    _, out, weights = pristine
    folder = str(tmp_path_factory.mktemp("load"))
    shutil.rmtree(folder)
    shutil.copytree(out, folder)
    if not _apply(os.path.join(folder, target), m):
        return
    try:
        model = DiffusionRM.from_pretrained(folder)
    except MsRmError:
        return
    loaded = {p.name: p.asnumpy() for p in model.get_parameters()}
    assert loaded.keys() == weights.keys()
    for name, value in weights.items():        # whatever loads holds exactly the converted weights
        assert np.array_equal(loaded[name], value), name


SOURCE_FILES = ["model/config.json", "model/checkpoint/backbone_lora/adapter_config.json",
                "model/checkpoint/backbone_lora/adapter_model.safetensors", "model/checkpoint/rm_head.pt",
                "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
                "first transformer shard", "last transformer shard", "scheduler/scheduler_config.json"]


@FUZZ
@given(target=st.sampled_from(SOURCE_FILES), m=mutation)
def test_fuzz_converting_reference_files(pristine, tmp_path_factory, target, m):
    paths, _, _ = pristine
    root = str(tmp_path_factory.mktemp("convert"))
    ref = os.path.join(root, "ref")
    shutil.copytree(os.path.dirname(paths.src), ref)
    if target.endswith("transformer shard"):
        shards = sorted(f for f in os.listdir(os.path.join(ref, "transformer")) if f.endswith(".safetensors"))
        target = os.path.join("transformer", shards[0] if target.startswith("first") else shards[-1])
    if not _apply(os.path.join(ref, target), m):
        return
    before = _files(ref)
    out = os.path.join(root, "out")
    try:
        DiffusionRM.convert(os.path.join(ref, "model"), os.path.join(ref, "transformer"), os.path.join(ref, "scheduler"), out,
                            progress=False)
    except MsRmError:
        assert not os.path.exists(out)
        assert sorted(os.listdir(root)) == ["ref"]                 # nothing left beside the output
        assert _files(ref) == before
        return
    DiffusionRM.from_pretrained(out, verify=True)                   # a conversion that succeeds loads


# --- foreign code and absurd headers ----------------------------------------------------------
def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    import torch

    from ms_rm.io.torch_file import TorchStateFile

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.zeros(2), "p": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(MsRmError, match="refused: not a plain weights file") as refused:
        TorchStateFile(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    message = str(refused.value)
    assert "\n" not in message and "'posix.system'" in message            # one line, naming the global
    for advice in ("add_safe_globals", "safe_globals", "allowlist", "weights_only", "trust"):
        assert advice not in message, message                             # never passes on torch's advice


def test_refused_pickle_of_io_open_names_it_and_nothing_else(tmp_path):
    import io

    import torch

    from ms_rm.io.torch_file import TorchStateFile

    class Opener:
        def __reduce__(self):
            return (io.open, (str(tmp_path / "created"), "w"))

    torch.save({"w": Opener()}, tmp_path / "open.pt")
    with pytest.raises(MsRmError) as refused:
        TorchStateFile(str(tmp_path / "open.pt"))
    assert str(refused.value) == (f"{tmp_path / 'open.pt'}: refused: not a plain weights file (it asks for the "
                                  "global 'io.open', which is not a tensor or plain container); ms_rm never runs "
                                  "code from a checkpoint")
    assert not (tmp_path / "created").exists()


# --- a converted folder edited after conversion ------------------------------------------------
@pytest.mark.parametrize("edit", [
    lambda c: c.update(u_convention="index"),
    lambda c: c["scheduler"].update(shift=1.0),
    lambda c: c.update(add_noise=False),
    lambda c: None,                                          # only the formatting changes
])
def test_a_config_edited_after_conversion_is_refused(pristine, tmp_path, edit):
    from ms_rm import CheckpointError

    folder = tmp_path / "converted"
    shutil.copytree(pristine[1], folder)
    config = json.loads((folder / "ms_rm_config.json").read_text())
    edit(config)
    (folder / "ms_rm_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="ms_rm_config.json: edited after conversion"):
        DiffusionRM.from_pretrained(str(folder))


def test_manifest_and_config_must_agree_on_the_u_convention(pristine, tmp_path):
    """Both files edited consistently except for the manifest's u_convention entry."""
    from ms_rm import CheckpointError
    from ms_rm.io.safetensors_file import sha256_file

    folder = tmp_path / "converted"
    shutil.copytree(pristine[1], folder)
    config = json.loads((folder / "ms_rm_config.json").read_text())
    config["u_convention"] = "index"
    (folder / "ms_rm_config.json").write_text(json.dumps(config))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["ms_rm_config.json"]["sha256"] = sha256_file(str(folder / "ms_rm_config.json"))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="u_convention 'index' differs from the manifest's 'sigma'"):
        DiffusionRM.from_pretrained(str(folder))


@pytest.mark.parametrize("header, message", [
    (None, "header length 1152921504606846976 exceeds the file"),
    ({"w": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 16]}}, "do not hold"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 2 ** 62]}}, "do not hold"),
    ({"w": {"dtype": "F32", "shape": [2 ** 28], "data_offsets": [0, 2 ** 30]}}, "the data section has only"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "unsupported dtype"),
])
def test_absurd_safetensors_headers_fail_fast_without_allocating(tmp_path, header, message):
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes((2 ** 60).to_bytes(8, "little") + b"{}")
    else:
        raw = json.dumps(header).encode()
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(16))
    start = time.perf_counter()
    with pytest.raises(MsRmError, match=message):
        SafetensorsFile(str(path))
    assert time.perf_counter() - start < 0.5


def test_the_converter_writes_only_under_out(pristine, tmp_path):
    paths, _, _ = pristine
    parent = tmp_path / "outputs"
    parent.mkdir()
    cwd_before = set(os.listdir("."))
    sources_before = _files(os.path.dirname(paths.src))
    DiffusionRM.convert(paths.src, paths.transformer, paths.scheduler, str(parent / "ms"), progress=False)
    assert os.listdir(parent) == ["ms"]
    assert set(os.listdir(".")) == cwd_before
    assert _files(os.path.dirname(paths.src)) == sources_before


# --- determinism -----------------------------------------------------------------------------
DETERMINISM_SCRIPT = """
import sys, numpy as np, mindspore as ms
ms.set_device("CPU")
from ms_rm import DiffusionRM
model = DiffusionRM.from_pretrained(sys.argv[1], mode=sys.argv[2])
rng = np.random.default_rng(0)
latents = rng.standard_normal((2, 16, 8, 8), dtype=np.float32)
ehs = rng.standard_normal((2, 5, 48), dtype=np.float32)
pooled = rng.standard_normal((2, 40), dtype=np.float32)
stages = model.reward_stages(latents, ehs, pooled, u=[0.3, 0.8], seed=1234)
np.savez(sys.argv[3], **{name: value.asnumpy() for name, value in stages.items()})
"""


def test_a_seed_gives_bit_identical_rewards_across_processes_and_close_ones_across_modes(pristine, tmp_path):
    """Graph mode twice in two processes: every stage bit for bit. PyNative against graph: every
    stage within the tolerance policy's bound for these inputs (ms_rm_parity.harness.policy_bounds:
    torch's own fp32 noise at that stage, x5, floor 1e-5), so the check holds on any x86 CPU
    (AVX2 and AVX-512 kernels round differently) and still fails on a real difference."""
    from ms_rm.rewards.diffusion_rm.noise import draw_noise
    from ms_rm_parity.compare import compare_stages, first_failure
    from ms_rm_parity.harness import Inputs, policy_bounds
    from ms_rm_parity.reference import load_reference_model

    paths, out, _ = pristine
    script = tmp_path / "score.py"
    script.write_text(DETERMINISM_SCRIPT)

    def run(mode, name):
        subprocess.run([sys.executable, str(script), out, mode, str(tmp_path / name)], check=True, cwd=tmp_path,
                       capture_output=True)
        with np.load(tmp_path / name) as stages:
            return {k: stages[k] for k in stages.files}

    graph_a, graph_b, pynative = run("graph", "a.npz"), run("graph", "b.npz"), run("pynative", "p.npz")
    assert graph_a.keys() == graph_b.keys() and all(np.array_equal(graph_a[k], graph_b[k]) for k in graph_a)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 16, 8, 8), dtype=np.float32)
    ehs, pooled = rng.standard_normal((2, 5, 48), dtype=np.float32), rng.standard_normal((2, 40), dtype=np.float32)
    inputs = Inputs(latents, ehs, pooled, draw_noise(latents.shape, seed=1234), [0.3, 0.8])
    torch_model, rm_config, scheduler_config = load_reference_model(paths.src, paths.transformer, paths.scheduler)
    bounds = policy_bounds(torch_model, rm_config, scheduler_config, inputs, "sigma", "fp32")
    results = compare_stages(pynative, graph_a, bounds, order=[k for k in graph_a if k not in ("sigma", "timestep")])
    assert first_failure(results) is None, [r.to_dict() for r in results if not r.passed]


def test_host_inputs_are_cached_for_a_bounded_number_of_shapes(pristine):
    """The positions / rotary tables computed on the host are kept per input shape (H, W, T, B),
    least recently used out: a run over many prompt lengths does not grow without bound."""
    from ms_rm.rewards.diffusion_rm.model import HOST_INPUT_CACHE

    model = DiffusionRM.from_pretrained(pristine[1])
    rng = np.random.default_rng(0)
    latents, pooled = rng.standard_normal((1, 16, 8, 8), dtype=np.float32), rng.standard_normal((1, 40), dtype=np.float32)
    text = lambda tokens: rng.standard_normal((1, tokens, 48), dtype=np.float32)
    first_text = text(1)
    first = model.reward(latents, first_text, pooled, u=0.5, seed=0).asnumpy()
    for tokens in range(2, HOST_INPUT_CACHE + 4):                   # a new text length each call
        model.reward(latents, text(tokens), pooled, u=0.5, seed=0)
        assert len(model._host_inputs) <= HOST_INPUT_CACHE
    assert len(model._host_inputs) == HOST_INPUT_CACHE and (8, 8, 1, 1) not in model._host_inputs
    again = model.reward(latents, first_text, pooled, u=0.5, seed=0).asnumpy()     # evicted, computed again
    np.testing.assert_array_equal(again, first)


def test_same_seed_same_rewards_in_process(pristine):
    _, out, _ = pristine
    model = DiffusionRM.from_pretrained(out)
    rng = np.random.default_rng(0)
    args = (rng.standard_normal((2, 16, 8, 8), dtype=np.float32), rng.standard_normal((2, 5, 48), dtype=np.float32),
            rng.standard_normal((2, 40), dtype=np.float32))
    first = model.reward(*args, u=0.5, seed=7).asnumpy()
    assert all(np.array_equal(first, model.reward(*args, u=0.5, seed=7).asnumpy()) for _ in range(3))
    with pytest.raises(InputError, match="seed must be a non-negative integer"):
        model.reward(*args, u=0.5, seed=-3)


def test_every_troubleshooting_message_is_asserted_by_a_test():
    """Each error message quoted in the Troubleshooting table (docs/troubleshooting.md) appears in a
    test's assertion."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    guide = (root / "docs" / "troubleshooting.md").read_text()
    section = guide.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    messages = [re.findall(r"`([^`]+)`", line)[0] for line in section.splitlines()
                if line.startswith("| `")]
    assert len(messages) >= 25
    tests = "".join(p.read_text() for p in (root / "tests").glob("test_*.py")).replace("\\", "")
    missing = [m for m in messages if m not in tests]         # regex escapes in the tests stripped
    assert not missing, f"Troubleshooting lists messages no test asserts: {missing}"

"""ms-rm convert and the loaders: output format, dtypes, atomic writes, and refusal of bad inputs."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from ms_rm import CheckpointError, ConfigError, DiffusionRM
from ms_rm.cli import main as cli
from ms_rm.io.converted import MANIFEST_FILE, WEIGHTS_FILE
from ms_rm.io.safetensors_file import SafetensorsFile
from ms_rm.rewards.diffusion_rm.conversion import ConversionPlan, open_reference

from helpers import reference_checkpoint


def make(root, mode="lora", **case_fields):
    """A tiny reference checkpoint saved under root; returns its paths."""
    return reference_checkpoint(root, seed=1, mode=mode, **case_fields)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def tree_hashes(folder):
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            out[path] = (sha256(path), os.stat(path).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def lora_ref(tmp_path_factory):
    return make(tmp_path_factory.mktemp("lora"), "lora", shard_size="80KB", model={"use_logistic": True})


def run_convert(paths, out, *extra):
    return cli(["convert", paths.src, "--transformer", paths.transformer, "--scheduler", paths.scheduler,
                "--out", str(out), "--no-progress", *extra])


def test_output_folder_and_manifest(lora_ref, tmp_path):
    before = tree_hashes(os.path.dirname(lora_ref.src))
    out = tmp_path / "ms"
    assert run_convert(lora_ref, out) == 0
    assert sorted(os.listdir(out)) == ["manifest.json", "model.safetensors", "ms_rm_config.json"]
    assert tree_hashes(os.path.dirname(lora_ref.src)) == before                 # sources untouched
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    for path, entry in manifest["sources"].items():                          # every source, hashed
        assert entry["sha256"] == sha256(path)
    assert any(p.endswith("rm_head.pt") for p in manifest["sources"])
    assert sum(p.endswith(".safetensors") and "transformer" in p for p in manifest["sources"]) > 1   # shards
    assert manifest["files"][WEIGHTS_FILE]["sha256"] == sha256(out / WEIGHTS_FILE)
    model = DiffusionRM.from_pretrained(str(out), verify=True)
    assert set(manifest["tensors"]) == {p.name for p in model.get_parameters()}
    q = manifest["tensors"]["backbone.transformer_blocks.0.attn.to_q.weight"]
    assert q["lora"] == {"module": "transformer_blocks.0.attn.to_q", "rank": 4, "alpha": 8.0, "scale": 2.0}
    assert q["from"] == "transformer:transformer_blocks.0.attn.to_q.weight" and q["dtype"] == "F32"
    assert manifest["tensors"]["eta4"]["default"] == 0.15                      # not in rm_head.pt
    assert any("eta3 = 0.0" in note for note in manifest["notes"])
    unused = manifest["unused"]["transformer"]
    assert unused["transformer_blocks.3.attn.to_q.weight"].startswith("block 3 lies after the deepest tap")
    assert "proj_out.weight" in unused and "pos_embed.pos_embed" in unused
    config = json.loads((out / "ms_rm_config.json").read_text())
    assert config["u_convention"] == "sigma" and config["num_transformer_layers"] == 3


def test_written_file_is_plain_safetensors(lora_ref, tmp_path):
    """The safetensors library itself reads our streamed file, with the values the plan produces."""
    from safetensors.numpy import load_file

    out = DiffusionRM.convert(lora_ref.src, lora_ref.transformer, lora_ref.scheduler, str(tmp_path / "ms"), progress=False)
    loaded = load_file(os.path.join(out, WEIGHTS_FILE))
    sources = open_reference(lora_ref.src, lora_ref.transformer, lora_ref.scheduler)
    plan = ConversionPlan.build(sources, DiffusionRM.parameter_shapes)
    assert set(loaded) == set(plan.names)
    for name in plan.names:
        np.testing.assert_array_equal(loaded[name], plan.tensor(name))
    sources.close()


@pytest.mark.parametrize("dtype, expected", [("keep", {"F32"}), ("fp32", {"F32"}), ("bf16", {"BF16"}), ("fp16", {"F16"})])
def test_dtype_option(lora_ref, tmp_path, dtype, expected):
    out = DiffusionRM.convert(lora_ref.src, lora_ref.transformer, lora_ref.scheduler, str(tmp_path / "ms"), dtype=dtype,
                              progress=False)
    with SafetensorsFile(os.path.join(out, WEIGHTS_FILE)) as f:
        names = {n for n in f.keys() if n.startswith("backbone.")}
        assert {{"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[f.dtype(n).name] for n in names} == expected
        merged = f.read("backbone.transformer_blocks.1.attn2.to_q.weight")
    sources = open_reference(lora_ref.src, lora_ref.transformer, lora_ref.scheduler)
    exact = ConversionPlan.build(sources, DiffusionRM.parameter_shapes).tensor("backbone.transformer_blocks.1.attn2.to_q.weight", "fp32")
    sources.close()
    # The LoRA merge runs in fp32; the cast to the output dtype (round to nearest even) comes after.
    np.testing.assert_array_equal(merged, exact.astype(merged.dtype))


def test_bf16_sources_are_read_bit_for_bit(tmp_path):
    paths = make(tmp_path / "ref", "head", base_dtype="bf16")
    out = DiffusionRM.convert(paths.src, paths.transformer, paths.scheduler, str(tmp_path / "ms"), progress=False)
    from safetensors import safe_open

    shard = [f for f in os.listdir(paths.transformer) if f.endswith(".safetensors")][0]
    with safe_open(os.path.join(paths.transformer, shard), "pt") as src, \
            SafetensorsFile(os.path.join(out, WEIGHTS_FILE)) as ours:
        for key in ("context_embedder.weight", "transformer_blocks.2.ff.net.2.weight"):
            original = src.get_tensor(key).view(torch.int16).numpy()
            assert np.array_equal(ours.read("backbone." + key).view(np.int16), original)
    config = json.loads(open(os.path.join(out, "ms_rm_config.json")).read())
    assert config["backbone"]["position_table_dtype"] == "bfloat16"


def test_u_convention_is_recorded(lora_ref, tmp_path):
    out = tmp_path / "ms"
    assert run_convert(lora_ref, out, "--u-convention", "index") == 0
    assert DiffusionRM.from_pretrained(str(out)).config.u_convention == "index"


def test_existing_output_needs_force(lora_ref, tmp_path, capsys):
    out = tmp_path / "ms"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert run_convert(lora_ref, out) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "old.txt").exists()
    assert run_convert(lora_ref, out, "--force") == 0
    assert not (out / "old.txt").exists() and (out / WEIGHTS_FILE).exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []       # no staging or backup left


def test_output_holding_a_source_is_refused(lora_ref, capsys):
    assert run_convert(lora_ref, os.path.dirname(lora_ref.src), "--force") == 2
    assert "holds source file" in capsys.readouterr().err
    assert os.path.exists(os.path.join(lora_ref.src, "config.json"))


def test_training_run_folder(tmp_path, capsys):
    paths = make(tmp_path / "run", "head")
    step = os.path.join(paths.src, "checkpoints", "step_00100")
    os.makedirs(os.path.dirname(step))
    shutil.move(os.path.join(paths.src, "checkpoint"), step)
    run = lambda *a: cli(["convert", *a, "--transformer", paths.transformer, "--scheduler", paths.scheduler,
                          "--no-progress"])
    assert run(paths.src, "--out", str(tmp_path / "a")) == 2
    assert "looks like a training run" in capsys.readouterr().err
    assert run(step, "--config", os.path.join(paths.src, "config.json"), "--out", str(tmp_path / "b")) == 0


def test_from_reference_equals_convert_then_load(lora_ref, tmp_path):
    direct = DiffusionRM.from_reference(lora_ref.src, lora_ref.transformer, lora_ref.scheduler)
    out = DiffusionRM.convert(lora_ref.src, lora_ref.transformer, lora_ref.scheduler, str(tmp_path / "ms"), progress=False)
    loaded = DiffusionRM.from_pretrained(out)
    for a, b in zip(direct.get_parameters(), loaded.get_parameters()):
        assert a.name == b.name and np.array_equal(a.asnumpy(), b.asnumpy())


def test_verify_detects_modified_weights(lora_ref, tmp_path):
    out = DiffusionRM.convert(lora_ref.src, lora_ref.transformer, lora_ref.scheduler, str(tmp_path / "ms"), progress=False)
    path = os.path.join(out, WEIGHTS_FILE)
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x3f")
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        DiffusionRM.from_pretrained(out, verify=True)


def test_manifest_mismatch_is_refused(lora_ref, tmp_path):
    out = DiffusionRM.convert(lora_ref.src, lora_ref.transformer, lora_ref.scheduler, str(tmp_path / "ms"), progress=False)
    manifest_path = os.path.join(out, MANIFEST_FILE)
    manifest = json.load(open(manifest_path))
    manifest["tensors"]["reward_head.head.bias"]["dtype"] = "BF16"
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(CheckpointError, match="does not match manifest.json"):
        DiffusionRM.from_pretrained(out)
    os.remove(manifest_path)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        DiffusionRM.from_pretrained(out)


# --- bad inputs: one-line error naming the file, exit status 2, no output --------------------------
def _truncate_shard(paths):
    shard = sorted(f for f in os.listdir(paths.transformer) if f.endswith(".safetensors"))[0]
    path = os.path.join(paths.transformer, shard)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return shard


def _corrupt_header(paths):
    shard = sorted(f for f in os.listdir(paths.transformer) if f.endswith(".safetensors"))[0]
    path = os.path.join(paths.transformer, shard)
    data = bytearray(open(path, "rb").read())
    data[8:20] = b"not json at "
    open(path, "wb").write(bytes(data))
    return shard


def _edit_head(paths, edit):
    path = os.path.join(paths.src, "checkpoint", "rm_head.pt")
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    return "rm_head.pt"


def _edit_transformer(paths, key, edit):
    from safetensors.torch import load_file, save_file

    path = os.path.join(paths.transformer, "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    edit(state, key)
    save_file(state, path)
    return "diffusion_pytorch_model.safetensors"


def _edit_json(path, edit):
    data = json.load(open(path))
    edit(data)
    json.dump(data, open(path, "w"))
    return os.path.basename(path)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('MS_RM_PWN_MARKER', '/tmp/ms_rm_pwned')}",))


def _evil_pickle(paths):
    torch.save({"attn1.to_q.weight": torch.zeros(2), "x": Evil()}, os.path.join(paths.src, "checkpoint", "rm_head.pt"))
    return "rm_head.pt"


def _lora_nan(paths):
    from safetensors.torch import load_file, save_file

    path = os.path.join(paths.src, "checkpoint", "backbone_lora", "adapter_model.safetensors")
    state = load_file(path)
    key = sorted(state)[0]
    state[key][0, 0] = float("nan")
    save_file(state, path)
    return "adapter_model.safetensors"


BAD = {
    "missing head": ("lora", lambda p: os.remove(os.path.join(p.src, "checkpoint", "rm_head.pt")) or "rm_head.pt",
                     "missing rm_head.pt"),
    "missing adapter": ("lora", lambda p: shutil.rmtree(os.path.join(p.src, "checkpoint", "backbone_lora")) or "backbone_lora",
                        "missing backbone_lora/adapter_config.json"),
    "missing full model": ("full", lambda p: os.remove(os.path.join(p.src, "checkpoint", "full_model.pt")) or "full_model.pt",
                           "says use_lora=false, freeze_backbone=false"),
    "missing transformer weights": ("head", lambda p: os.remove(os.path.join(p.transformer, "diffusion_pytorch_model.safetensors"))
                                    or "transformer", "no diffusion_pytorch_model.safetensors"),
    "truncated safetensors": ("head", _truncate_shard, "truncated"),
    "corrupt header": ("head", _corrupt_header, "header is not valid JSON"),
    "pickle that is not weights": ("head", _evil_pickle, "refused: not a plain weights file"),
    "missing head key": ("head", lambda p: _edit_head(p, lambda s: s.pop("head.bias")), "1 missing keys: reward_head.head.bias"),
    "unexpected head key": ("head", lambda p: _edit_head(p, lambda s: s.update(extra=torch.zeros(1))),
                            "1 unexpected keys: reward_head.extra"),
    "wrong shape": ("head", lambda p: _edit_transformer(p, "context_embedder.weight",
                                                        lambda s, k: s.update({k: s[k][:, :10].contiguous()})),
                    "'context_embedder.weight' in .* has shape \\(64, 10\\), the model expects \\(64, 48\\)"),
    "nan in transformer": ("head", lambda p: _edit_transformer(p, "transformer_blocks.1.ff.net.2.weight",
                                                               lambda s, k: s[k].__setitem__((0, 0), float("nan"))),
                           "'transformer_blocks.1.ff.net.2.weight' has 1 NaN/Inf values"),
    "inf in head": ("head", lambda p: _edit_head(p, lambda s: s["attn1.to_q.weight"].__setitem__((1, 1), float("inf"))),
                    "'attn1.to_q.weight' has 1 NaN/Inf values"),
    "nan in lora": ("lora", _lora_nan, "has NaN/Inf values"),
    "layer count beyond the transformer": ("head", lambda p: _edit_json(os.path.join(p.src, "config.json"),
                                                                        lambda c: c["model"].update(num_transformer_layers=4)),
                                           r"num_transformer_layers \(4\) must be in 1\.\.3"),
    "width that contradicts the weights": ("head", lambda p: _edit_json(os.path.join(p.transformer, "config.json"),
                                                                        lambda c: c.update(num_attention_heads=8, caption_projection_dim=128)),
                                           "config.* match these weights"),
    "taps that contradict the head": ("head", lambda p: _edit_json(os.path.join(p.src, "config.json"),
                                                                   lambda c: c["model"].update(visual_head_idx=[1, 2])),
                                      "unexpected keys: reward_head.layer_adapters_visual.2"),
    "DoRA adapter": ("lora", lambda p: _edit_json(os.path.join(p.src, "checkpoint", "backbone_lora", "adapter_config.json"),
                                                  lambda c: c.update(use_dora=True)), "DoRA adapters"),
    "trained biases": ("lora", lambda p: _edit_json(os.path.join(p.src, "checkpoint", "backbone_lora", "adapter_config.json"),
                                                    lambda c: c.update(bias="all")), "bias='all'"),
    "adapter holding untargeted modules": ("lora", lambda p: _edit_json(
        os.path.join(p.src, "checkpoint", "backbone_lora", "adapter_config.json"),
        lambda c: c.update(target_modules=["to_q"])), "which .*adapter_config.json does not target"),
    "logistic without its parameters": ("full", lambda p: _edit_json(os.path.join(p.src, "config.json"),
                                                                     lambda c: c["model"].update(use_logistic=True)),
                                        "2 missing keys: eta3, eta4"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gives_one_line_error_and_no_output(tmp_path, capsys, monkeypatch, name):
    mode, damage, message = BAD[name]
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MS_RM_PWN_MARKER", str(marker))
    paths = make(tmp_path / "ref", mode, shard_size="80KB" if name in ("truncated safetensors", "corrupt header") else None)
    culprit = damage(paths)
    before = tree_hashes(str(tmp_path / "ref"))
    out = tmp_path / "ms"
    assert run_convert(paths, out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ms-rm convert: error: ")
    import re

    assert re.search(message, err), err
    assert culprit in err or name.startswith(("layer count", "DoRA", "trained", "width")), err
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    assert tree_hashes(str(tmp_path / "ref")) == before                       # sources untouched
    assert not marker.exists()                                                 # no foreign code ran


def test_fp16_overflow_is_refused(tmp_path):
    paths = make(tmp_path / "ref", "head")
    _edit_head(paths, lambda s: s["attn1.to_q.weight"].__setitem__((0, 0), 1e6))
    with pytest.raises(CheckpointError, match="overflow float16"):
        DiffusionRM.convert(paths.src, paths.transformer, paths.scheduler, str(tmp_path / "ms"), dtype="fp16", progress=False)
    assert not (tmp_path / "ms").exists()


# --- LoRA settings follow peft's own matching ---------------------------------------------------
MODULES = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn2.to_q", "transformer_blocks.1.attn.add_k_proj",
           "transformer_blocks.1.attn.to_out.0", "transformer_blocks.11.attn.to_add_out", "transformer_blocks.1.ff.net.2",
           "transformer_blocks.2.attn2.to_v", "context_embedder", "time_text_embed.timestep_embedder.linear_1"]


@pytest.mark.parametrize("settings", [
    {"target_modules": ["to_q", "to_out.0", "add_k_proj"]},
    {"target_modules": ["to_q", "to_v"], "exclude_modules": ["transformer_blocks.0.attn2.to_q"]},
    {"target_modules": r".*attn2?\.to_[qv]", "exclude_modules": r".*blocks\.2\..*"},
    {"target_modules": ["to_add_out", "context_embedder"], "exclude_modules": ["to_add_out"]},
])
def test_targets_follow_peft(settings):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from ms_rm.io.lora import LoraSettings

    ours = LoraSettings.from_dict(dict(r=4, lora_alpha=8, **settings), "test")
    peft_config = LoraConfig(r=4, lora_alpha=8, **settings)
    for module in MODULES:
        expected = check_target_module_exists(peft_config, module)
        assert ours.targets(module) == bool(expected) and type(expected).__name__ != "_ExcludedModule" \
            or not ours.targets(module) and (not expected or type(expected).__name__ == "_ExcludedModule"), module


def test_rank_and_alpha_patterns_follow_peft():
    from peft.utils.other import get_pattern_key

    from ms_rm.io.lora import LoraSettings

    ranks, alphas = {"to_q": 2, "attn2.to_v": 6}, {"add_k_proj": 3, r"blocks\.1\..*": 5}
    ours = LoraSettings.from_dict(dict(r=4, lora_alpha=8, target_modules=["to_q"], rank_pattern=ranks,
                                       alpha_pattern=alphas, use_rslora=True), "test")
    for module in MODULES:
        r = ranks.get(get_pattern_key(ranks.keys(), module), 4)
        alpha = alphas.get(get_pattern_key(alphas.keys(), module), 8)
        assert ours.rank_alpha_scale(module) == (r, alpha, alpha / r ** 0.5), module


@pytest.mark.parametrize("setting, message", [({"use_dora": True}, "DoRA"), ({"peft_type": "LOHA"}, "peft_type 'LOHA'"),
                                              ({"layers_to_transform": [1]}, "layers_to_transform"),
                                              ({"modules_to_save": ["proj"]}, "modules_to_save"),
                                              ({"r": 0}, "r must be a positive integer"),
                                              ({"target_modules": 5}, "target_modules must be")])
def test_unsupported_adapter_settings_are_refused(setting, message):
    from ms_rm.io.lora import LoraSettings

    with pytest.raises(ConfigError, match=message):
        LoraSettings.from_dict(dict(dict(r=4, lora_alpha=8, target_modules=["to_q"]), **setting), "adapter_config.json")


# --- ms-rm score -----------------------------------------------------------------------------
def test_score_command(lora_ref, tmp_path, capsys):
    out = DiffusionRM.convert(lora_ref.src, lora_ref.transformer, lora_ref.scheduler, str(tmp_path / "ms"), progress=False)
    rng = np.random.default_rng(0)
    arrays = dict(latents=rng.standard_normal((3, 16, 8, 8), dtype=np.float32),
                  encoder_hidden_states=rng.standard_normal((3, 5, 48), dtype=np.float32),
                  pooled_projections=rng.standard_normal((3, 40), dtype=np.float32),
                  noise=rng.standard_normal((3, 16, 8, 8), dtype=np.float32))
    np.savez(tmp_path / "in.npz", **arrays)
    assert cli(["score", out, "--inputs", str(tmp_path / "in.npz"), "--u", "0.4", "--out", str(tmp_path / "out.npz"),
                "--features"]) == 0
    printed = capsys.readouterr().out.splitlines()
    result = dict(np.load(tmp_path / "out.npz"))
    expected = DiffusionRM.from_pretrained(out).reward_stages(arrays["latents"], arrays["encoder_hidden_states"],
                                                              arrays["pooled_projections"], u=0.4, noise=arrays["noise"])
    assert set(result) == set(expected) and len(printed) == 3
    for key in result:
        np.testing.assert_allclose(result[key], expected[key].asnumpy(), rtol=1e-6, atol=1e-7)
    assert float(printed[1].split("\t")[1]) == pytest.approx(result["reward"][1, 0], abs=1e-6)


def test_score_refuses_incomplete_inputs(lora_ref, tmp_path, capsys):
    out = DiffusionRM.convert(lora_ref.src, lora_ref.transformer, lora_ref.scheduler, str(tmp_path / "ms"), progress=False)
    np.savez(tmp_path / "in.npz", latents=np.zeros((1, 16, 8, 8), np.float32))
    assert cli(["score", out, "--inputs", str(tmp_path / "in.npz"), "--u", "0.4", "--out", str(tmp_path / "o.npz")]) == 2
    assert "missing arrays ['encoder_hidden_states', 'pooled_projections']" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


def test_source_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli(["convert", str(tmp_path / "empty"), "--transformer", str(tmp_path), "--scheduler", str(tmp_path),
                "--out", str(tmp_path / "out")]) == 2
    assert "no config.json; pass the model directory" in capsys.readouterr().err


def test_truncated_torch_file(tmp_path):
    from ms_rm.io.torch_file import TorchStateFile

    torch.save({"w": torch.zeros(64, 64)}, tmp_path / "head.pt")
    data = (tmp_path / "head.pt").read_bytes()
    (tmp_path / "head.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="cannot read: corrupt or truncated torch file"):
        TorchStateFile(str(tmp_path / "head.pt"))


def test_reading_pt_without_torch_says_how_to_install(tmp_path, monkeypatch):
    import sys

    from ms_rm import MissingDependencyError
    from ms_rm.io.torch_file import TorchStateFile

    monkeypatch.setitem(sys.modules, "torch", None)          # as if torch were not installed
    with pytest.raises(MissingDependencyError, match=r"reading \.pt checkpoints needs torch; install it with"):
        TorchStateFile(str(tmp_path / "rm_head.pt"))


def test_corrupted_weights_fail_their_crc_even_without_verify(lora_ref, tmp_path):
    out = DiffusionRM.convert(lora_ref.src, lora_ref.transformer, lora_ref.scheduler, str(tmp_path / "ms"), progress=False)
    path = os.path.join(out, WEIGHTS_FILE)
    with open(path, "r+b") as f:
        f.seek(-100, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CheckpointError, match="fails its CRC32 check"):
        DiffusionRM.from_pretrained(out)


def test_torch_reads_are_copies_and_survive_dropped_pages(tmp_path):
    """Reading a .pt tensor drops its mapped pages afterwards; reading it again still gives its values."""
    from ms_rm.io.torch_file import TorchStateFile

    state = {"a": torch.randn(300, 300), "b": torch.randn(7).to(torch.bfloat16)}
    torch.save(state, tmp_path / "s.pt")
    f = TorchStateFile(str(tmp_path / "s.pt"))
    first = f.read("a")
    first[0, 0] = 1e9                                              # a copy: the file is not touched
    again = f.read("a")
    np.testing.assert_array_equal(again, state["a"].numpy())
    np.testing.assert_array_equal(f.read("b").view(np.int16), state["b"].view(torch.int16).numpy())

"""LoRA in both formats users share, read by every ms_rm entry point that loads one
(ms_rm.io.lora.LoraAdapter, behind SD3Generator.from_pretrained(lora=) and `ms-rm generate --lora`):
a peft adapter folder, and diffusers' pytorch_lora_weights.safetensors (a folder holding it, or
the file) written by diffusers' own StableDiffusion3Pipeline.save_lora_weights, with and without
the lora_adapter_metadata its training scripts add. The merged generator's velocity is compared
with what diffusers itself makes of the file, with peft's model and with the peft-folder path;
and ms_rm's own diffusers file is loaded back by diffusers.
"""

import os

import numpy as np
import pytest
from peft import LoraConfig

from ms_rm import CheckpointError, ConfigError, SD3Generator
from ms_rm.cli import main as cli
from ms_rm_parity.compare import FP32_BOUND, max_rel_error
from ms_rm_parity.generator import _inputs, _reference
from ms_rm_parity.lora_files import diffusers_loaded, lora_models, save_diffusers_lora, torch_velocity

TIMESTEP = np.array([700.0, 300.0], np.float32)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd3"))
    return folder, _reference(0, folder)


def _velocity(folder, lora, **kwargs):
    a = _inputs(0)
    generator = SD3Generator.from_pretrained(folder, lora=lora, mode="pynative", **kwargs)
    return generator.predict_velocity(hidden_states=a["noise"], timestep=TIMESTEP, encoder_hidden_states=a["ehs"],
                                      pooled_projections=a["pooled"]).asnumpy()


@pytest.mark.parametrize("alpha, rank_pattern, metadata", [
    (4, {}, False),                  # scale 1: what diffusers assumes without metadata
    (8, {}, True),                   # alpha survives only in the metadata
    (8, {"to_k": 2}, False),         # mixed ranks, no metadata: alpha = the first module's rank (to_k's: 2)
])
def test_diffusers_file_merges_as_diffusers_loads_it(base, tmp_path, alpha, rank_pattern, metadata):
    folder, transformer = base
    config = LoraConfig(r=4, lora_alpha=alpha, rank_pattern=rank_pattern, target_modules=TARGETS)
    adapted, peft_model = lora_models(transformer, config, seed=5)
    save_diffusers_lora(adapted, str(tmp_path / "diffusers"), metadata)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    assert os.listdir(tmp_path / "diffusers") == ["pytorch_lora_weights.safetensors"]

    a = _inputs(0)
    theirs = torch_velocity(diffusers_loaded(transformer, str(tmp_path / "diffusers")), a, TIMESTEP)
    ours = _velocity(folder, str(tmp_path / "diffusers"))
    assert max_rel_error(ours, theirs) <= FP32_BOUND
    file = str(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors")
    np.testing.assert_array_equal(_velocity(folder, file), ours)
    base_velocity = torch_velocity(transformer, a, TIMESTEP)
    assert max_rel_error(ours, base_velocity) > 1e-2                       # the LoRA changes the output
    peft_velocity = torch_velocity(peft_model, a, TIMESTEP)
    if metadata or alpha == 4:       # the file holds the peft model's settings: all three agree
        assert max_rel_error(ours, peft_velocity) <= FP32_BOUND
        np.testing.assert_array_equal(_velocity(folder, str(tmp_path / "peft")), ours)
    else:                            # alpha 8 is lost: diffusers (and ms_rm) merge at alpha = 2
        assert max_rel_error(ours, peft_velocity) > 1e-3
        separate = _velocity(folder, str(tmp_path / "diffusers"), lora_mode="train")
        assert max_rel_error(separate, theirs) <= FP32_BOUND


def test_ms_rm_writes_the_diffusers_file_that_diffusers_loads(base, tmp_path):
    from ms_rm.io.lora import save_lora

    folder, transformer = base
    adapted, _ = lora_models(transformer, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), seed=6)
    save_diffusers_lora(adapted, str(tmp_path / "theirs"), metadata=True)
    generator = SD3Generator.from_pretrained(folder, lora=str(tmp_path / "theirs"), lora_mode="train", mode="pynative")
    save_lora(generator, str(tmp_path / "ours"), 4, 8, TARGETS, lora_format="diffusers")
    a = _inputs(0)
    theirs = torch_velocity(diffusers_loaded(transformer, str(tmp_path / "ours")), a, TIMESTEP)
    assert max_rel_error(theirs, torch_velocity(adapted, a, TIMESTEP)) <= FP32_BOUND
    np.testing.assert_array_equal(_velocity(folder, str(tmp_path / "ours")), _velocity(folder, str(tmp_path / "theirs")))
    with pytest.raises(ConfigError, match="lora_format must be 'peft' or 'diffusers', got 'kohya'"):
        save_lora(generator, str(tmp_path / "bad"), 4, 8, TARGETS, lora_format="kohya")


def _file(path, tensors, metadata=None):
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path, metadata)
    return path


def _bytes(path):
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"not weights")
    return str(path)


LORA_A = np.zeros((4, 64), np.float32)
LORA_B = np.zeros((64, 4), np.float32)


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "absent"), "no such file or folder; a LoRA is read from a peft adapter folder"),
    (lambda d: (d / "empty").mkdir() or str(d / "empty"),
     r"no LoRA there; a LoRA is read from a peft adapter folder \(adapter_config.json \+ adapter_model.safetensors\), "
     r"a diffusers LoRA folder \(pytorch_lora_weights.safetensors"),
    (lambda d: _bytes(d / "w.bin"), "a LoRA is read from"),
    (lambda d: os.path.dirname(_bytes(d / "pickled" / "pytorch_lora_weights.bin")),
     "holds pytorch_lora_weights.bin \\(a pickle\\)"),
    (lambda d: _file(str(d / "te" / "pytorch_lora_weights.safetensors"),
                     {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": LORA_A}),
     "is a text encoder's LoRA: ms_rm applies a LoRA to the SD3 transformer only"),
    (lambda d: _file(str(d / "kohya.safetensors"), {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": LORA_A}),
     "not a transformer LoRA factor in diffusers' format .*kohya's lora_unet_"),
    (lambda d: _file(str(d / "peft_weights.safetensors"),
                     {"base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": LORA_A}),
     "is a peft adapter's: pass its folder, with its adapter_config.json"),
    (lambda d: _file(str(d / "half.safetensors"), {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": LORA_A}),
     "modules with only one of lora_A/lora_B"),
    (lambda d: _file(str(d / "meta.safetensors"), {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": LORA_A,
                                                   "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": LORA_B},
                     {"lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": 4, '
                                               '"transformer.target_modules": ["to_q"], "transformer.use_dora": true}'}),
     r"meta.safetensors \(lora_adapter_metadata\): DoRA adapters"),
    (lambda d: _file(str(d / "rank.safetensors"), {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": LORA_A[:2],
                                                   "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": LORA_B}),
     r"has shape \(2, 64\), expected \(4, 64\) \(rank 4 from .* settings from the lora_B shapes"),
])
def test_what_is_not_a_lora_is_refused_naming_the_formats(base, tmp_path, capsys, make, message):
    folder, _ = base
    path = make(tmp_path)
    with pytest.raises(CheckpointError if "DoRA" not in message else ConfigError, match=message):
        SD3Generator.from_pretrained(folder, lora=path, mode="pynative")
    np.savez(tmp_path / "in.npz", prompt_embeds=_inputs(0)["ehs"], pooled_prompt_embeds=_inputs(0)["pooled"])
    assert cli(["generate", folder, "--embeds", str(tmp_path / "in.npz"), "--lora", path, "--out",
                str(tmp_path / "out.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not os.path.exists(tmp_path / "out.npz"), err

"""The generator: full SD3 transformer, sampler, VAE decoder, LoRA gradients, `ms-rm generate`.

Parity with diffusers / peft / torch autograd runs through the harness cases (sd3-transformer,
sd3-sampling, sd3-lora, sd3-vae-decode); here also what a user calls, its errors, a deliberately
broken model that must fail, and the released SD3.5-Medium config's parameter count.
"""

import json
import os

import numpy as np
import pytest
import torch

from ms_rm import CheckpointError, ConfigError, InputError, SD3Generator
from ms_rm.cli import main as cli
from ms_rm_parity.compare import FP32_BOUND, compare_stages
from ms_rm_parity.generator import (GENERATOR_CASES, LARGE, LATENT_HW, _inputs, _reference, block_state_stages,
                                    diffusers_block_states, run_generator_case)

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.mark.parametrize("name", [n for n in GENERATOR_CASES if not n.endswith(LARGE)])
def test_generator_case_matches_torch(name):
    reports = run_generator_case(name, ["graph", "pynative"], "fp32", 0, "CPU", "cpu")
    for report in reports:
        assert report.passed, (report.mode, [(r.stage, r.max_rel, r.bound) for r in report.stages if not r.passed])
        assert len(report.stages) >= 4


@pytest.mark.parametrize("name", [n for n in GENERATOR_CASES if n.endswith(LARGE)])
def test_large_weight_generator_case_matches_torch(name):
    """The transformer and the VAE decoder with their matrices and norms 3x (SiLU / GELU inputs beyond
    15, attention logits beyond 30): within torch fp32's own error against float64 x 5 (the tolerance
    policy; above the fixed 1e-5 floor there, torch's own error reaching 4e-5): the transformer compiled,
    the decoder in PyNative (the cheaper mode for it)."""
    mode = "graph" if name.startswith("sd3-transformer") else "pynative"
    report = run_generator_case(name, [mode], "fp32", 0, "CPU", "cpu")[0]
    assert report.passed, [(r.stage, r.max_rel, r.bound) for r in report.stages if not r.passed]
    assert report.stages[-1].stage in ("velocity", "images_3x5")


def test_a_wrong_output_norm_fails_at_the_velocity(monkeypatch):
    """norm_out is AdaLayerNormContinuous: scale first, then shift. Swapping them must show."""
    import ms_rm.backbones.sd3_transformer as module

    original = module.modulate
    monkeypatch.setattr(module, "modulate", lambda x, shift, scale: original(x, scale, shift))
    report = run_generator_case("sd3-transformer", ["pynative"], "fp32", 0, "CPU", "cpu")[0]
    assert report.first_failure == "velocity"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    _reference(0, str(root))
    return str(root)


@pytest.fixture(scope="module")
def generator(folder):
    return SD3Generator.from_pretrained(folder, mode="pynative")


def test_predict_velocity_is_diffusers_forward_with_both_streams(folder):
    """Flow-GRPO's call, `transformer(hidden_states=, timestep=, encoder_hidden_states=,
    pooled_projections=)`, one timestep for the batch: the velocity and, with output_block_states,
    temb and both streams after every block against diffusers' SD3Transformer2DModel, within the
    fp32 bound the generator cases use; compiled in graph mode, once per method."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(os.path.join(folder, "transformer")).eval()
    gen = SD3Generator.from_pretrained(folder, mode="graph")
    a = _inputs(1)
    call = dict(hidden_states=a["noise"], timestep=612.5, encoder_hidden_states=a["ehs"],
                pooled_projections=a["pooled"])
    ref = diffusers_block_states(transformer, a["noise"], np.full(2, 612.5, np.float32), a["ehs"], a["pooled"])
    out = gen.predict_velocity(**call, output_block_states=True)
    results = compare_stages(block_state_stages(out), ref, {"default": FP32_BOUND})
    assert all(r.passed for r in results), [(r.stage, r.max_rel, r.bound) for r in results if not r.passed]
    layers = gen.config.num_layers
    assert len(out["image_states"]) == layers and len(out["text_states"]) == layers - 1
    assert sum(r.stage.endswith("_text") for r in results) == layers - 1
    velocity = gen.predict_velocity(**call)
    np.testing.assert_array_equal(velocity.asnumpy(), out["velocity"].asnumpy())
    assert {"velocity", "block_outputs"} <= set(gen._compiled)
    with pytest.raises(InputError, match=r"timestep must have shape \(2\)"):
        gen.predict_velocity(**dict(call, timestep=np.zeros(3, np.float32)))
    with pytest.raises(InputError, match=r"hidden_states must have shape \(\*, 16, \*, \*\)"):
        gen.predict_velocity(**dict(call, hidden_states=a["noise"][:, :4]))


@pytest.mark.parametrize("change, message", [
    (dict(num_inference_steps=0), "num_inference_steps must be an integer in 1..10000"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0"),
    (dict(guidance_scale=4.0, negative_prompt_embeds=None), "guidance_scale > 1 needs negative_prompt_embeds"),
    (dict(noise="nan"), "noise contains NaN"),
    (dict(noise="3d"), r"noise must have shape \(\*, 16, \*, \*\)"),
    (dict(negative_prompt_embeds="short"), "negative_prompt_embeds has shape .* prompt_embeds .* must match"),
    (dict(prompt_embeds="wide"), r"encoder_hidden_states must have shape \(2, \*, 48\)"),
    (dict(sigmas=[0.9, 1.5]), r"sigmas must be a non-empty list of noise levels in \(0, 1\]"),
    (dict(sde=True, sde_noise="wrong"), r"sde_noise must have shape \(4, 2, 16, 16, 12\)"),
])
def test_bad_generation_inputs_name_the_argument(generator, change, message):
    a = _inputs(0)
    kwargs = dict(prompt_embeds=a["ehs"], pooled_prompt_embeds=a["pooled"], noise=a["noise"], num_inference_steps=4,
                  guidance_scale=4.5, negative_prompt_embeds=a["neg"], negative_pooled_prompt_embeds=a["neg_pooled"])
    kwargs.update(change)
    if kwargs.get("sigmas") is not None:
        kwargs["num_inference_steps"] = None
    replacements = {"nan": np.full_like(a["noise"], np.nan), "3d": a["noise"][0], "short": a["neg"][:, :3],
                    "wide": np.zeros((2, 7, 47), np.float32), "wrong": np.zeros((1, 2, 16, 16, 12), np.float32)}
    kwargs = {k: replacements[v] if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(InputError, match=message):
        generator.generate(**kwargs)


def test_loading_is_strict_and_refuses_other_schedulers(folder, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if k != "proj_out.bias"}, str(weights))
    with pytest.raises(CheckpointError, match="proj_out.bias"):
        SD3Generator.from_pretrained(str(copy))
    config = json.load(open(os.path.join(folder, "scheduler", "scheduler_config.json")))
    with open(copy / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump(dict(config, use_karras_sigmas=True), f)
    with pytest.raises(ConfigError, match="use_karras_sigmas"):
        SD3Generator.from_pretrained(str(copy))
    with pytest.raises(ConfigError, match="lora_mode must be 'merge' or 'train'"):
        SD3Generator.from_pretrained(folder, lora=folder, lora_mode="fused")


def test_generate_cli_writes_latents_and_log_probs(folder, generator, tmp_path):
    a = _inputs(0)
    np.savez(tmp_path / "in.npz", prompt_embeds=a["ehs"], pooled_prompt_embeds=a["pooled"], noise=a["noise"],
             negative_prompt_embeds=a["neg"], negative_pooled_prompt_embeds=a["neg_pooled"])
    assert cli(["generate", folder, "--embeds", str(tmp_path / "in.npz"), "--steps", "3", "--guidance", "4.5",
                "--out", str(tmp_path / "out.npz"), "--no-progress"]) == 0
    expected = generator.generate(a["ehs"], a["pooled"], a["noise"], 3, 4.5, a["neg"], a["neg_pooled"]).asnumpy()
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["latents"], expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert cli(["generate", folder, "--embeds", str(tmp_path / "in.npz"), "--steps", "2", "--guidance", "1", "--sde",
                "--seed", "3", "--out", str(tmp_path / "sde.npz"), "--no-progress"]) == 0
    with np.load(tmp_path / "sde.npz") as out:
        assert out["log_probs"].shape == (2, 2) and np.isfinite(out["log_probs"]).all()
        sde_latents = out["latents"]
    assert cli(["generate", folder, "--embeds", str(tmp_path / "in.npz"), "--steps", "2", "--guidance", "1", "--sde",
                "--sde-type", "cps", "--seed", "3", "--out", str(tmp_path / "cps.npz"), "--no-progress"]) == 0
    cps = generator.generate(a["ehs"], a["pooled"], a["noise"], 2, 1.0, sde=True, sde_type="cps", seed=3,
                             return_trajectory=True)
    with np.load(tmp_path / "cps.npz") as out:
        np.testing.assert_allclose(out["latents"], cps["latents"].asnumpy(), rtol=0,
                                   atol=1e-5 * np.abs(out["latents"]).max())
        np.testing.assert_allclose(out["log_probs"], np.stack([p.asnumpy() for p in cps["log_probs"]], axis=1),
                                   rtol=1e-5)
        assert np.abs(out["latents"] - sde_latents).max() > 1e-2          # another step than "sde"
    with pytest.raises(ConfigError, match="sde_type must be 'sde' or 'cps'"):
        generator.generate(a["ehs"], a["pooled"], a["noise"], 2, 1.0, sde=True, sde_type="flow")
    with pytest.raises(InputError, match="sde_type='cps' chooses the stochastic step: it needs sde=True"):
        generator.generate(a["ehs"], a["pooled"], a["noise"], 2, 1.0, sde_type="cps")
    assert cli(["generate", folder, "--embeds", str(tmp_path / "in.npz"), "--sde-type", "cps", "--out",
                str(tmp_path / "bad.npz")]) == 2
    assert cli(["generate", folder, "--embeds", str(tmp_path / "in.npz"), "--steps", "0", "--out",
                str(tmp_path / "bad.npz")]) == 2
    assert not os.path.exists(tmp_path / "bad.npz")


def test_generate_cli_decodes_pngs_with_the_folders_vae(folder, tmp_path):
    import shutil

    from PIL import Image

    from ms_rm.vae.decoder import load_vae_decoder
    from ms_rm_parity.vae_reference import build_reference_vae, tiny_vae_config

    pipeline = tmp_path / "pipeline"
    shutil.copytree(folder, pipeline)
    build_reference_vae(tiny_vae_config(), seed=1).save_pretrained(str(pipeline / "vae"), safe_serialization=True)
    a = _inputs(0)
    np.savez(tmp_path / "in.npz", prompt_embeds=a["ehs"][:1], pooled_prompt_embeds=a["pooled"][:1])
    args = ["generate", str(pipeline), "--embeds", str(tmp_path / "in.npz"), "--steps", "2", "--guidance", "1",
            "--height", "64", "--width", "48", "--seed", "0", "--out", str(tmp_path / "out.npz"), "--png",
            str(tmp_path / "png"), "--no-progress"]
    assert cli(args) == 0
    image = np.asarray(Image.open(tmp_path / "png" / "0000.png"))
    with np.load(tmp_path / "out.npz") as out:
        assert out["latents"].shape == (1, 16, 8, 6)
        expected = load_vae_decoder(str(pipeline)).to_images(out["latents"])[0]
    assert image.shape == (64, 48, 3) and np.abs(image.astype(int) - expected).max() <= 1
    assert cli(args) == 2                                 # the PNG folder exists: refused without --force
    assert cli(args + ["--force"]) == 0


def test_sd35_medium_config_builds_with_diffusers_parameter_count():
    from diffusers import SD3Transformer2DModel

    from ms_rm.backbones.config import SD3BackboneConfig
    from ms_rm.io.files import read_config_file

    raw = read_config_file(os.path.join(CONFIGS, "sd35m", "transformer_config.json"))
    generator = SD3Generator(SD3BackboneConfig.from_diffusers(raw))
    ours = {p.name[len("transformer."):]: tuple(p.shape) for p in generator.get_parameters()}
    with torch.device("meta"):
        theirs = SD3Transformer2DModel(**{k: v for k, v in raw.items() if not k.startswith("_")})
    expected = {k: tuple(p.shape) for k, p in theirs.named_parameters()}
    assert ours == expected
    assert sum(int(np.prod(s)) for s in ours.values()) == sum(p.numel() for p in theirs.parameters()) == 2_243_171_520


def test_trainable_lora_factors_start_as_peft_does(generator):
    """add_lora: B = 0 (the adapter changes nothing at first), A bounded by 1/sqrt(in)."""
    fresh = SD3Generator(generator.config, generator.scheduler, mode="pynative")
    fresh.load_state_dict({p.name[len("transformer."):]: p.asnumpy() for p in generator.get_parameters()})
    modules = fresh.add_lora(rank=2, alpha=4, target_modules=["to_q", "to_v"])
    assert len(modules) == 2 * 7 and len(fresh.lora_parameters()) == 4 * 7
    a = _inputs(0)
    args = (a["ehs"], a["pooled"], a["noise"], 2, 1.0)
    np.testing.assert_array_equal(fresh.generate(*args).asnumpy(), generator.generate(*args).asnumpy())
    state = fresh.lora_state()
    assert "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight" in state
    assert not any(np.any(v) for k, v in state.items() if "lora_B" in k)
    with pytest.raises(InputError, match="no Linear of the transformer matches"):
        fresh.add_lora(rank=2, alpha=4, target_modules=["to_nothing"])
    assert LATENT_HW == (16, 12)


@pytest.mark.parametrize("shift", [1.0, 3.0, 2.7])
def test_schedule_is_set_timesteps_bit_for_bit(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ms_rm.core.flow_match import SchedulerConfig, inference_schedule

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    for steps, sigmas in [(1, None), (4, None), (28, None), (50, None), (None, [0.9, 0.55, 0.2, 0.05])]:
        scheduler.set_timesteps(steps, sigmas=sigmas)
        ours_sigmas, ours_timesteps = inference_schedule(SchedulerConfig(shift=shift), steps, sigmas)
        np.testing.assert_array_equal(ours_sigmas, scheduler.sigmas.numpy())
        np.testing.assert_array_equal(ours_timesteps, scheduler.timesteps.numpy())


def test_lora_added_after_a_compiled_call_takes_effect_and_sde_noise_is_its_own(folder):
    """add_lora drops the compiled calls made before it; --sde with a seed never reuses the initial noise."""
    gen = SD3Generator.from_pretrained(folder, mode="graph")
    a = _inputs(0)
    args = (a["ehs"], a["pooled"], a["noise"], 2, 1.0)
    before = gen.generate(*args).asnumpy()
    gen.add_lora(rank=2, alpha=2, target_modules=["to_q"])
    for p in gen.lora_parameters():
        p.set_data(p * 0 + 0.5)
    assert np.abs(gen.generate(*args).asnumpy() - before).max() > 1e-3
    assert len(gen.lora_gradients("weighted_step", *_step_args(gen, a))[1]) == len(gen.lora_parameters())
    out = gen.generate(a["ehs"], a["pooled"], np.random.default_rng(3).standard_normal(a["noise"].shape, np.float32),
                       2, 1.0, sde=True, seed=3, return_trajectory=True)
    assert np.isfinite(out["latents"].asnumpy()).all()
    first = np.random.default_rng([3, 1]).standard_normal((2,) + a["noise"].shape, np.float32)[0]
    assert not np.array_equal(first, np.random.default_rng(3).standard_normal(a["noise"].shape, np.float32))


def _step_args(gen, a):
    from mindspore import Tensor

    return (Tensor(a["noise"]), Tensor(np.full(2, 700.0, np.float32)), Tensor(a["ehs"]), Tensor(a["pooled"]),
            Tensor(gen.transformer.positions(*LATENT_HW)), Tensor(np.float32(0.7)), Tensor(np.float32(0.3)),
            Tensor(np.ones(a["noise"].shape, np.float32)))


def test_stop_after_returns_the_latents_of_that_step(generator):
    a = _inputs(0)
    full = generator.generate(a["ehs"], a["pooled"], a["noise"], 4, 1.0, return_trajectory=True)
    for k in (0, 2, 4):
        part = generator.generate(a["ehs"], a["pooled"], a["noise"], 4, 1.0, stop_after=k)
        np.testing.assert_array_equal(part.asnumpy(), full["trajectory"][k].asnumpy())
    with pytest.raises(InputError, match=r"stop_after must lie in 0..4"):
        generator.generate(a["ehs"], a["pooled"], a["noise"], 4, 1.0, stop_after=5)

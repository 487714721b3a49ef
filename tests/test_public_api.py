"""The public tensor program of the reward models: prepare(...) then forward(*tensors) is reward(...);
forward composes under ms.jit and ms.value_and_grad; a scorer's noise policy draws once and the
inputs are checked once; every Diffusion-RM backbone answers the Backbone protocol."""

import numpy as np
import pytest
import mindspore as ms

from ms_rm import DiffusionRM, InputError, RewardModelConfig
from ms_rm.backbones.protocol import Backbone, take_rows
from ms_rm.cli.demo import TINY_SD35
from ms_rm.core import inputs as core_inputs
from ms_rm.rewards.diffusion_rm.model import RewardInputs
from ms_rm.rewards.diffusion_rm.noise import NoisePolicy
from ms_rm.scoring import DiffusionRMScorer
from ms_rm.scoring.runs import input_arrays
from ms_rm_parity.cases import CASES, SCHEDULER

ms.runtime.launch_blocking()


def _model(name: str, mode: str = "pynative") -> DiffusionRM:
    if name == "demo":
        return DiffusionRM(RewardModelConfig.from_dict(TINY_SD35), mode=mode).randomize(0)
    case = CASES[name]
    config = RewardModelConfig.from_reference(case.rm_config(), case.transformer, case.scheduler or SCHEDULER,
                                              time_convention=case.time_convention)
    return DiffusionRM(config, mode=mode).randomize(1)


def _arrays(model: DiffusionRM, batch: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, model.config.backbone.latent_channels, 8, 8), dtype=np.float32)
    width = model.config.backbone.text_width
    if "pooled_projections" in model.backbone.text_inputs:
        ehs = rng.standard_normal((batch, 6, width), dtype=np.float32)
        pooled = rng.standard_normal((batch, model.config.backbone.pooled_projection_dim), dtype=np.float32)
    else:
        ehs, pooled = [rng.standard_normal((n, width), dtype=np.float32) for n in (5, 9, 3)][:batch], None
    noise = rng.standard_normal(latents.shape, dtype=np.float32)
    return latents, ehs, pooled, noise


@pytest.fixture(scope="module")
def sd3():
    return _model("demo")


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_prepare_then_forward_is_reward(mode):
    model = _model("demo", mode)
    latents, ehs, pooled, noise = _arrays(model)
    inputs = model.prepare(latents, ehs, pooled, u=0.4, noise=noise)
    assert all(isinstance(t, ms.Tensor) for t in inputs)
    expected = model.reward(latents, ehs, pooled, u=0.4, noise=noise).asnumpy()
    np.testing.assert_array_equal(model.run("forward", *inputs).asnumpy(), expected)
    np.testing.assert_array_equal(model.run("construct", *inputs)[-1].asnumpy(), expected)
    checked = model.check_inputs(latents, ehs, pooled)
    np.testing.assert_array_equal(model.reward(checked, u=0.4, noise=noise).asnumpy(), expected)


@pytest.mark.parametrize("name", ["demo", "tiny-flux-dev", "tiny-zimage"])
def test_every_backbone_answers_the_protocol_and_prepare_forward_is_reward(name):
    model = _model(name)
    assert isinstance(model.backbone, Backbone)
    latents, ehs, pooled, noise = _arrays(model)
    text = model.backbone.check_text(3, ehs, pooled)
    assert set(text) == set(model.backbone.text_inputs)
    tensors, key = model.backbone.text_tensors(text, 8, 8)
    assert all(isinstance(t, ms.Tensor) for t in tensors)
    assert all(isinstance(a, np.ndarray) for a in model.backbone.host_inputs(*key))
    groups = model.backbone.noise_groups(text)
    assert len(groups) == 3 and len(set(groups)) == 3
    required, optional = input_arrays(model)
    assert required == ("latents",) + model.backbone.text_inputs
    assert optional == ("noise",) + model.backbone.optional_text_inputs
    inputs = model.prepare(latents, ehs, pooled, u=[0.2, 0.5, 0.8], noise=noise)
    np.testing.assert_array_equal(model.forward(*inputs).asnumpy(),
                                  model.reward(latents, ehs, pooled, u=[0.2, 0.5, 0.8], noise=noise).asnumpy())


def test_text_protocol_per_family():
    flux, zimage = _model("tiny-flux-dev"), _model("tiny-zimage")
    assert flux.backbone.text_inputs == ("encoder_hidden_states", "pooled_projections")
    assert zimage.backbone.text_inputs == ("encoder_hidden_states",)
    assert zimage.backbone.optional_text_inputs == ("encoder_attention_mask",)
    assert not hasattr(zimage.config.backbone, "pooled_projection_dim")      # no SD3 aliases on Z-Image's config
    assert zimage.config.backbone.text_width == zimage.config.backbone.cap_feat_dim
    assert flux.backbone.guidance_scale == flux.config.guidance_scale       # FLUX's own options reach FLUX only


def test_forward_composes_under_value_and_grad_and_jit(sd3):
    latents, ehs, pooled, noise = _arrays(sd3)
    inputs = sd3.prepare(latents, ehs, pooled, u=0.4, noise=noise)

    def total(x, *rest):
        return sd3.forward(x * 1.0, *rest).sum()

    value, grad = ms.value_and_grad(total, grad_position=0)(*inputs)
    jitted_value, jitted_grad = ms.jit(ms.value_and_grad(total, grad_position=0))(*inputs)
    assert np.isclose(float(value), float(sd3.reward(latents, ehs, pooled, u=0.4, noise=noise).sum()), rtol=1e-6)
    assert grad.shape == latents.shape and np.isfinite(grad.asnumpy()).all() and np.abs(grad.asnumpy()).max() > 0
    np.testing.assert_allclose(jitted_grad.asnumpy(), grad.asnumpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(jitted_value), float(value), rtol=1e-6)


def test_prepare_noise_sources(sd3):
    latents, ehs, pooled, noise = _arrays(sd3)
    by_seed = sd3.prepare(latents, ehs, pooled, u=0.4, seed=3)[1].asnumpy()
    np.testing.assert_array_equal(by_seed, sd3.prepare(latents, ehs, pooled, u=0.4, seed=3)[1].asnumpy())
    policy = NoisePolicy(seed=7, noise="fixed")
    np.testing.assert_array_equal(sd3.prepare(latents, ehs, pooled, u=0.4, noise=policy)[1].asnumpy(),
                                  np.random.default_rng(7).standard_normal(latents.shape, dtype=np.float32))
    with pytest.raises(InputError, match="either noise or seed"):
        sd3.prepare(latents, ehs, pooled, u=0.4, noise=noise, seed=1)
    with pytest.raises(InputError, match="u is required"):
        sd3.prepare(latents, ehs, pooled)
    with pytest.raises(InputError, match="RewardInputs carry their text"):
        sd3.prepare(sd3.check_inputs(latents, ehs, pooled), ehs, u=0.4)


def test_scorer_draws_with_its_policy_once_and_checks_inputs_once(sd3, monkeypatch):
    latents, ehs, pooled, _ = _arrays(sd3, batch=4)
    scorer = DiffusionRMScorer(model=sd3, seed=5, max_batch=3, num_noise_draws=2)
    expected = scorer.score_latents(latents, ehs, pooled)
    scorer = DiffusionRMScorer(model=sd3, seed=5, max_batch=3, num_noise_draws=2)
    draws, checked = [], []
    original_draw, original_check = scorer.noise_policy.draw, core_inputs.check_finite
    monkeypatch.setattr(scorer.noise_policy, "draw", lambda *a: draws.append(a) or original_draw(*a))
    monkeypatch.setattr(sd3.noise_policy, "sample", lambda shape: pytest.fail("the model's own noise policy was used"))
    monkeypatch.setattr(core_inputs, "check_finite", lambda t, name: checked.append(name) or original_check(t, name))
    assert scorer.score_latents(latents, ehs, pooled) == expected
    assert len(draws) == 1                                          # one draw for the whole batch, all chunks
    assert sorted(checked) == ["encoder_hidden_states", "latents", "pooled_projections"]   # once each, no noise


def test_reward_inputs_rows_stay_on_the_device(sd3):
    latents, ehs, pooled, _ = _arrays(sd3, batch=4)
    inputs = sd3.check_inputs(latents, ehs, pooled)
    picked = inputs.rows([2, 0, 2])
    assert isinstance(picked, RewardInputs) and isinstance(picked.latents, ms.Tensor)
    np.testing.assert_array_equal(picked.latents.asnumpy(), latents[[2, 0, 2]])
    np.testing.assert_array_equal(picked.text["pooled_projections"].asnumpy(), pooled[[2, 0, 2]])
    np.testing.assert_array_equal(inputs.rows(slice(1, 3)).text["encoder_hidden_states"].asnumpy(), ehs[1:3])
    assert take_rows([10, 11, 12], [2, 0]) == [12, 10] and take_rows(None, [0]) is None


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_imagereward_prepare_forward_is_reward(mode):
    from ms_rm.rewards.imagereward import ImageReward, tiny_config
    from ms_rm_parity.imagereward import tiny_inputs

    model = ImageReward(tiny_config(), mode=mode).randomize(2)
    pixels, raw, ids, mask = tiny_inputs(model.config, seed=1, batch=2)
    np.testing.assert_array_equal(model.run("forward", *model.prepare(pixels, ids, mask)).asnumpy(),
                                  model.reward(pixels, ids, mask).asnumpy())
    np.testing.assert_array_equal(model.reward(pixels, ids, mask).asnumpy(),
                                  model.stages(pixels, ids, mask)["reward"].asnumpy())
    prepared = model.prepare_pixels(raw, ids, mask)
    np.testing.assert_array_equal(model.run("forward_pixels", *prepared).asnumpy(),
                                  model.reward_of_pixels(raw, ids, mask).asnumpy())
    by_shape = model.prepare_pixels(raw.shape, ids, mask)          # a trainer makes the pixels in its loss
    assert by_shape[0] is None and all(np.array_equal(a.asnumpy(), b.asnumpy())
                                       for a, b in zip(by_shape[1:], prepared[1:]))
    grad = ms.grad(lambda *t: model.forward_pixels(*t).sum(), grad_position=0)(*prepared)
    assert grad.shape == raw.shape and np.isfinite(grad.asnumpy()).all()


def test_clip_prepare_forward_is_reward_and_the_embeddings_cosine(tmp_path):
    from ms_rm.rewards.clip import CLIPModel
    from ms_rm_parity.clip_parity import write_tiny_clip

    folder = str(tmp_path / "clip")
    write_tiny_clip(folder, "laion", seed=3)
    model = CLIPModel.from_pretrained(folder, mode="graph")
    size, length = model.config.vision.image_size, 9
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((2, 3, size, size), dtype=np.float32)
    ids = rng.integers(1, model.config.text.vocab_size, (2, length))
    reward = model.reward(pixels, ids).asnumpy()
    np.testing.assert_array_equal(model.run("forward", *model.prepare(pixels, ids)).asnumpy(), reward)
    cosine = (model.encode_images(pixels).asnumpy() * model.encode_text(ids).asnumpy()).sum(-1, keepdims=True)
    np.testing.assert_allclose(reward, cosine, rtol=1e-6, atol=1e-7)

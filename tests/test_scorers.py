"""The Flow-GRPO-MS scorers: numbers, noise policy, batching, gradient, MultiScorer."""

import numpy as np
import pytest
import mindspore as ms

from ms_rm import ConfigError, DiffusionRM, InputError
from ms_rm.cli.demo import TINY_SD35
from ms_rm.scoring import SCORERS, DiffusionRMSD3Scorer, MultiScorer

from ms_rm_parity.compare import FP32_BOUND, max_rel_error

from helpers import converted_checkpoint

B = 4


@pytest.fixture(scope="module")
def model():
    return DiffusionRM(TINY_SD35).randomize(0)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    return dict(latents=rng.standard_normal((B, 16, 8, 8), dtype=np.float32),
                ehs=rng.standard_normal((B, 6, 64), dtype=np.float32),
                pooled=rng.standard_normal((B, 32), dtype=np.float32))


def scorer(model, **kw):
    kw.setdefault("u", 0.4)
    return DiffusionRMSD3Scorer(model=model, **kw)


def test_scores_equal_the_model_reward_for_the_same_noise(model, batch):
    s = scorer(model, seed=7, noise="fixed")
    eps = np.random.default_rng(7).standard_normal((1, 1, B, 16, 8, 8), dtype=np.float32)[0, 0]
    expected = model.reward(batch["latents"], batch["ehs"], batch["pooled"], u=0.4, noise=eps).asnumpy()[:, 0]
    scores = s.score_latents(batch["latents"], batch["ehs"], batch["pooled"])
    assert isinstance(scores, list) and len(scores) == B and all(isinstance(v, float) for v in scores)
    np.testing.assert_array_equal(np.float32(scores), expected)


def test_bf16_inputs_from_a_trainer(model, batch):
    s = scorer(model, seed=7, noise="fixed")
    as_bf16 = lambda a: ms.Tensor(a).astype(ms.bfloat16)
    scores = s.score_latents(as_bf16(batch["latents"]), as_bf16(batch["ehs"]), as_bf16(batch["pooled"]))
    reference = s.score_latents(batch["latents"], batch["ehs"], batch["pooled"])
    assert np.abs(np.subtract(scores, reference)).max() < 0.05 * np.abs(reference).max()


def test_max_batch_changes_nothing_beyond_fp32_rounding(model, batch):
    """The same noise reaches each sample; only the GEMM blocking (which depends on the batch
    size, in MindSpore's kernels) can move the last digits."""
    whole = scorer(model, seed=3, noise="fixed").score_latents(batch["latents"], batch["ehs"], batch["pooled"])
    split = scorer(model, seed=3, noise="fixed", max_batch=3).score_latents(batch["latents"], batch["ehs"], batch["pooled"])
    assert max_rel_error(split, whole) <= FP32_BOUND


def test_common_random_numbers_within_a_prompt_group(model, batch):
    s = scorer(model, seed=5, common_noise=True)
    noise = s.draw_noise((B, 16, 8, 8), groups=["a", "b", "a", "c"])
    assert np.array_equal(noise[:, :, 0], noise[:, :, 2])
    assert not np.array_equal(noise[:, :, 0], noise[:, :, 1]) and not np.array_equal(noise[:, :, 1], noise[:, :, 3])
    # Same prompt (equal pooled embedding) and same latents: the same noise, so the same reward.
    latents, ehs, pooled = (batch[k].copy() for k in ("latents", "ehs", "pooled"))
    latents[2], ehs[2], pooled[2] = latents[0], ehs[0], pooled[0]
    scores = s.score_latents(latents, ehs, pooled)
    assert scores[0] == scores[2] and len(set(scores)) == 3


def test_averaging_over_noise_draws(model, batch):
    s = scorer(model, seed=11, noise="fixed", num_noise_draws=3)
    draws = np.random.default_rng(11).standard_normal((3, 1, B, 16, 8, 8), dtype=np.float32)
    singles = [model.reward(batch["latents"], batch["ehs"], batch["pooled"], u=0.4, noise=d[0]).asnumpy()[:, 0]
               for d in draws]
    assert max_rel_error(s.score_latents(batch["latents"], batch["ehs"], batch["pooled"]),
                         np.mean(singles, axis=0)) <= FP32_BOUND


def test_ensemble_of_noise_levels(model, batch):
    s = scorer(model, seed=2, noise="fixed", ensemble_u=[0.2, 0.5, 0.7])
    eps = np.random.default_rng(2).standard_normal((1, 3, B, 16, 8, 8), dtype=np.float32)[0]
    expected = model.reward_ensemble(batch["latents"], batch["ehs"], batch["pooled"], us=[0.2, 0.5, 0.7], noise=eps)
    np.testing.assert_array_equal(np.float32(s.score_latents(batch["latents"], batch["ehs"], batch["pooled"])),
                                  expected.asnumpy()[:, 0])


@pytest.mark.parametrize("normalize, scale, offset", [("none", 1, 0), ("reference", 0.1, 1.0), ("flow-grpo-ms", 0.2, 0),
                                                       ((2.0, -1.0), 2.0, -1.0)])
def test_normalization(model, batch, normalize, scale, offset):
    raw = scorer(model, seed=1, noise="fixed").score_latents(batch["latents"], batch["ehs"], batch["pooled"])
    scores = scorer(model, seed=1, noise="fixed", normalize=normalize).score_latents(
        batch["latents"], batch["ehs"], batch["pooled"])
    np.testing.assert_allclose(scores, np.float32(raw) * scale + offset, rtol=1e-6, atol=1e-6)


def test_fresh_noise_differs_per_call_and_a_seed_makes_the_sequence_reproducible(model, batch):
    args = (batch["latents"], batch["ehs"], batch["pooled"])
    first = scorer(model, seed=9)
    a, b = first.score_latents(*args), first.score_latents(*args)
    assert a != b
    second = scorer(model, seed=9)
    assert second.score_latents(*args) == a and second.score_latents(*args) == b


class _FixedLatentsEncoder:
    """Stands in for an image encoder: every image becomes the given latents and prompt embeddings."""

    def __init__(self, batch):
        self.batch = batch

    def encode_pixels(self, pixels):
        return self.batch["latents"][:len(pixels)]

    def encode_prompts(self, prompts):
        return self.batch["ehs"][:len(prompts)], self.batch["pooled"][:len(prompts)]


def test_default_u_is_one_per_kind_of_input(model, batch):
    """One documented default per input kind (RECOMMENDED_U): sampler latents at 0.4, images from
    disk at 0.1 (sigma convention), the same in the scorer and in ms-rm score-images."""
    from ms_rm.rewards.diffusion_rm import RECOMMENDED_U

    assert RECOMMENDED_U[("latents", "sigma")] == 0.4 and RECOMMENDED_U[("images", "sigma")] == 0.1
    default = DiffusionRMSD3Scorer(model=model, seed=5, noise="fixed", encoder=_FixedLatentsEncoder(batch))
    assert default.u is None and default.default_u("latents") == 0.4 and default.default_u("images") == 0.1
    explicit = {u: scorer(model, u=u, seed=5, noise="fixed") for u in (0.1, 0.4)}
    latents_args = (batch["latents"][:2], batch["ehs"][:2], batch["pooled"][:2])
    assert default.score_latents(*latents_args) == explicit[0.4].score_latents(*latents_args)
    images = [np.full((16, 16, 3), 0.5, np.float32) for _ in range(2)]       # two images (the stand-in ignores pixels)
    assert default(images, ["a", "b"]) == explicit[0.1].score_latents(*latents_args)
    assert explicit[0.1].score_latents(*latents_args) != explicit[0.4].score_latents(*latents_args)
    index_model = DiffusionRM(model.config.replace(u_convention="index"))
    assert DiffusionRMSD3Scorer(model=index_model).default_u("latents") == 0.9
    with pytest.raises(ConfigError, match="no recommended u for images under the 'index' u convention"):
        DiffusionRMSD3Scorer(model=index_model).default_u("images")


def test_gradient_matches_finite_differences(model, batch):
    s = scorer(model, seed=4, noise="fixed")
    conds = {"encoder_hidden_states": batch["ehs"], "pooled_projections": batch["pooled"]}
    f = lambda x: s.reward(x, conds).sum()
    latents = ms.Tensor(batch["latents"])
    _, grad = ms.value_and_grad(f)(latents)
    grad = grad.asnumpy()
    # Along the gradient (the steepest direction) and along the largest single coordinate: a
    # central difference in fp32 with step 1e-2 carries ~1e-5 of rounding, far below 1%.
    unit = np.zeros_like(grad)
    unit.flat[np.abs(grad).argmax()] = 1.0
    for direction in (grad / np.linalg.norm(grad), unit):
        eps = 1e-2
        plus = float(f(ms.Tensor(batch["latents"] + eps * direction)))
        minus = float(f(ms.Tensor(batch["latents"] - eps * direction)))
        numeric = (plus - minus) / (2 * eps)
        analytic = float((grad * direction).sum())
        assert abs(analytic - numeric) <= 1e-2 * abs(numeric), (analytic, numeric)


def test_images_need_an_encoder(model):
    with pytest.raises(ConfigError, match="pass encoder="):
        scorer(model)([np.zeros((3, 64, 64), np.float32)], ["a prompt"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise="fixed"), "needs a seed"), (dict(noise="sometimes"), "noise must be one of"),
    (dict(num_noise_draws=0), "num_noise_draws"), (dict(max_batch=0), "max_batch"),
    (dict(normalize="softmax"), "normalize must be one of"), (dict(ensemble_u=[]), "ensemble_u"),
])
def test_bad_scorer_settings(model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        scorer(model, **kwargs)


def test_text_conds_must_hold_both_embeddings(model, batch):
    with pytest.raises(InputError, match="pooled_projections"):
        scorer(model).reward(batch["latents"], {"encoder_hidden_states": batch["ehs"]})


# --- MultiScorer -------------------------------------------------------------------------------
class PixelScorer:
    """A stand-in for an image scorer: mean brightness per image."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts=None):
        self.calls += 1
        return [float(np.mean(image)) for image in images]


def test_multi_scorer_weights_and_routes(model, batch):
    drm = scorer(model, seed=1, noise="fixed")
    pixel = PixelScorer()
    multi = MultiScorer({"diffusion-rm-sd3": 0.5, "brightness": 2.0}, {"diffusion-rm-sd3": drm, "brightness": pixel})
    images = [np.full((3, 8, 8), v, np.float32) for v in (0.1, 0.2, 0.3, 0.4)]
    out = multi(images, ["p"] * B, latents=batch["latents"], prompt_embeds=batch["ehs"],
                pooled_prompt_embeds=batch["pooled"])
    assert list(out) == ["diffusion-rm-sd3", "brightness", "avg"]
    expected_drm = drm.score_latents(batch["latents"], batch["ehs"], batch["pooled"])
    assert out["diffusion-rm-sd3"] == expected_drm and out["brightness"] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert out["avg"] == pytest.approx([0.5 * d + 2.0 * p for d, p in zip(expected_drm, out["brightness"])])
    assert pixel.calls == 1


def test_multi_scorer_with_latent_scorers_only_needs_no_images(model, batch):
    multi = MultiScorer({"diffusion-rm-sd3": 1.0}, {"diffusion-rm-sd3": scorer(model)})
    out = multi(None, None, latents=batch["latents"], prompt_embeds=batch["ehs"], pooled_prompt_embeds=batch["pooled"])
    assert len(out["avg"]) == B and out["avg"] == out["diffusion-rm-sd3"]


def test_multi_scorer_errors(model, batch):
    with pytest.raises(ConfigError, match="'avg' is reserved"):
        MultiScorer({"avg": 1.0})
    with pytest.raises(ConfigError, match="unknown scorer 'hpsv3': registered are .*'aesthetic'"):
        MultiScorer({"hpsv3": 1.0})
    with pytest.raises(ConfigError, match="pass exactly one of checkpoint_path"):     # registered, needs its folder
        MultiScorer({"aesthetic": 1.0})
    with pytest.raises(ConfigError, match="pass exactly one of model_path"):      # registered, needs its folder
        MultiScorer({"pickscore": 1.0})
    with pytest.raises(ConfigError, match="pass exactly one of checkpoint_path"):
        MultiScorer({"imagereward": 1.0})
    with pytest.raises(ConfigError, match="without a weight"):
        MultiScorer({"diffusion-rm-sd3": 1.0}, {"diffusion-rm-sd3": scorer(model), "other": {}})
    multi = MultiScorer({"brightness": 1.0}, {"brightness": PixelScorer()})
    with pytest.raises(InputError, match="scores images, and this call carries none"):
        multi(None, None, latents=batch["latents"], prompt_embeds=batch["ehs"], pooled_prompt_embeds=batch["pooled"])


def test_registry_builds_scorers_from_config(tmp_path):
    _, out = converted_checkpoint(tmp_path)
    assert SCORERS["diffusion-rm-sd3"] is DiffusionRMSD3Scorer
    multi = MultiScorer({"diffusion-rm-sd3": 1.0},
                        {"diffusion-rm-sd3": {"checkpoint_path": out, "u": 0.4, "seed": 0, "noise": "fixed"}})
    rng = np.random.default_rng(0)
    out_scores = multi(None, None, latents=rng.standard_normal((2, 16, 8, 8), dtype=np.float32),
                       prompt_embeds=rng.standard_normal((2, 5, 48), dtype=np.float32),
                       pooled_prompt_embeds=rng.standard_normal((2, 40), dtype=np.float32))
    assert len(out_scores["diffusion-rm-sd3"]) == 2 and np.isfinite(out_scores["avg"]).all()


def test_flux_scorer_scores_a_converted_flux_checkpoint(tmp_path):
    from ms_rm.scoring import DiffusionRMFluxScorer
    from ms_rm_parity.cases import CASES

    _, out = converted_checkpoint(tmp_path, CASES["tiny-flux-dev"])
    assert SCORERS["diffusion-rm-flux"] is DiffusionRMFluxScorer
    multi = MultiScorer({"diffusion-rm-flux": 1.0},
                        {"diffusion-rm-flux": {"checkpoint_path": out, "u": 0.4, "seed": 2, "noise": "fixed"}})
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 16, 8, 12), dtype=np.float32)
    ehs, pooled = rng.standard_normal((2, 5, 48), dtype=np.float32), rng.standard_normal((2, 40), dtype=np.float32)
    scores = multi(None, None, latents=latents, prompt_embeds=ehs, pooled_prompt_embeds=pooled)["diffusion-rm-flux"]
    eps = np.random.default_rng(2).standard_normal((1, 1, 2, 16, 8, 12), dtype=np.float32)[0, 0]
    expected = DiffusionRM.from_pretrained(out).reward(latents, ehs, pooled, u=0.4, noise=eps).asnumpy()[:, 0]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    with pytest.raises(ConfigError, match="scores sd3 models; this checkpoint's backbone is flux"):
        DiffusionRMSD3Scorer(out)

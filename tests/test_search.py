"""Noise search: the db1 wavelets against PyWavelets, SES and random search against the reference
with its randomness injected, the generate-and-score objective, `ms-rm search`, bad input."""

import json
import os

import numpy as np
import pytest
import torch

from ms_rm import ConfigError, DiffusionRM, InputError, SD3Generator
from ms_rm.cli import main as cli
from ms_rm.search import GenerateAndScore, random_search, ses_search
from ms_rm.search.wavelets import wavedec2, waverec2
from ms_rm_parity.search_reference import reference_random, reference_ses

from helpers import converted_checkpoint, import_extra

pywt = import_extra("pywt", "PyWavelets", "test")


@pytest.mark.parametrize("shape, levels", [((4, 8, 8), 3), ((16, 128, 128), 4), ((3, 7, 5), 2), ((2, 13, 22), 3)])
def test_db1_transform_is_pywavelets_bit_for_bit(shape, levels):
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    ref = pywt.wavedec2(x, "db1", mode="symmetric", level=levels, axes=(-2, -1))
    ours = wavedec2(x, levels)
    np.testing.assert_array_equal(ours[0], ref[0])
    for theirs, mine in zip(ref[1:], ours[1:]):
        for a, b in zip(theirs, mine):
            np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(waverec2(ours), pywt.waverec2(ref, "db1", mode="symmetric", axes=(-2, -1)))


def _synthetic(seed: int = 5):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((1, 4, 32, 24), dtype=np.float32)
    target = rng.standard_normal((4, 32, 24), dtype=np.float32)

    def score(z):
        z = np.ascontiguousarray(z, dtype=np.float32)
        return float(-np.mean((z - target) ** 2) + np.tanh(z[0, :4, :4].sum()))

    return base, score


@pytest.mark.parametrize("budget", [7, 23, 30, 50])
def test_ses_follows_the_reference_step_for_step(budget):
    """Same Gaussian stream on both sides: the same candidates, elites, mean and variance per
    generation and the same result. torch reduces the last few columns of a mean in another
    order (CPU-dependent), so means and candidates agree to float32 rounding, not bit for bit."""
    base, score = _synthetic()
    ours = ses_search(lambda batch: [score(z) for z in batch], base, budget, popsize=10, elites=5, levels=3,
                      rng=np.random.default_rng(11))
    stream = np.random.default_rng(11)
    ref = reference_ses(torch.from_numpy(base), lambda z: score(z[0].numpy()),
                        lambda p, n: torch.from_numpy(stream.standard_normal((p, n), dtype=np.float32)),
                        budget, 10, 5, 3)
    assert len(ours.candidates) == len(ref["evaluated"]) == budget
    assert len(ours.generations) == len(ref["generations"]) == -(-budget // 10)
    for a, b in zip(ours.candidates, ref["evaluated"]):
        np.testing.assert_allclose(a["low"], b["low"].numpy().ravel(), rtol=0, atol=2e-6)
        assert abs(a["score"] - b["score"]) <= 1e-5
    for a, b in zip(ours.generations, ref["generations"]):
        assert a["elites"] == b["elites"]
        np.testing.assert_allclose(a["mean"], b["mean"], rtol=0, atol=2e-6)
        np.testing.assert_allclose(a["var"], b["var"], rtol=1e-5, atol=1e-7)
    assert ours.best_index == ref["best"]["evaluation"]
    np.testing.assert_allclose(ours.best_noise, ref["best"]["noise"].numpy(), rtol=0, atol=2e-6)
    assert ours.best_so_far()[-1] == ours.best_score == max(c["score"] for c in ours.candidates)


def test_random_search_follows_the_reference_and_keeps_the_earliest_best():
    base, score = _synthetic(7)
    ours = random_search(lambda batch: [score(z) for z in batch], base, 12, seed=3, batch_size=5)
    draws = lambda i: torch.from_numpy(np.random.default_rng([3, i]).standard_normal(base.shape[1:], np.float32))[None]
    ref = reference_random(torch.from_numpy(base), lambda z: score(z[0].numpy()), draws, 12)
    assert [c["score"] for c in ours.candidates] == ref["scores"]
    assert ours.best_index == ref["best_index"] and ours.best_score == ref["best_score"]
    np.testing.assert_array_equal(ours.best_noise, ref["best_noise"].numpy())
    best = ours.candidates[ours.best_index]
    if best["seed"] is not None:                          # the record rebuilds the best draw
        np.testing.assert_array_equal(np.random.default_rng(best["seed"]).standard_normal(base.shape[1:], np.float32),
                                      ours.best_noise[0])
    flat = random_search(lambda batch: np.zeros(len(batch)), base, 5, seed=0)
    assert flat.best_index == 0                          # ties keep the base noise (strictly higher only)


def test_random_search_replays_the_callers_rng_as_the_reference_baseline():
    """The tutorial's baseline with the caller's randomness: the reference's draws taken in order
    from one numpy stream, ours given the same stream as rng=."""
    base, score = _synthetic(7)
    ours = random_search(lambda batch: [score(z) for z in batch], base, 12, batch_size=5,
                         rng=np.random.default_rng(21))
    stream = np.random.default_rng(21)
    ref = reference_random(torch.from_numpy(base), lambda z: score(z[0].numpy()),
                           lambda i: torch.from_numpy(stream.standard_normal(base.shape[1:], np.float32))[None], 12)
    assert [c["score"] for c in ours.candidates] == ref["scores"]
    assert ours.best_index == ref["best_index"] > 0
    np.testing.assert_array_equal(ours.best_noise, ref["best_noise"].numpy())
    assert all(c["seed"] is None for c in ours.candidates)          # the draws are the caller's, not a seed's
    seeded = random_search(lambda batch: [score(z) for z in batch], base, 12, batch_size=5)
    assert [c["score"] for c in seeded.candidates][1:] != ref["scores"][1:]


@pytest.mark.parametrize("search", [lambda o, b, **k: random_search(o, b, 6, batch_size=4, **k),
                                    lambda o, b, **k: ses_search(o, b, 6, popsize=3, elites=2, levels=2, **k)],
                         ids=["random", "ses"])
def test_both_searches_keep_the_callers_shape_and_take_the_same_rng_hook(search):
    base, score = _synthetic()
    objective = lambda batch: [score(z) for z in batch]
    for noise in (base, base[0]):                                 # (1, C, H, W) and (C, H, W)
        result = search(objective, noise, rng=np.random.default_rng(2))
        assert result.best_noise.shape == noise.shape and result.best_noise.dtype == np.float32
        again = search(objective, noise, rng=np.random.default_rng(2))
        assert [c["score"] for c in again.candidates] == [c["score"] for c in result.candidates]
    with pytest.raises(InputError, match="rng must be a numpy Generator"):
        search(objective, base, rng=2)


@pytest.mark.parametrize("call, message", [
    (lambda b, o: ses_search(o, b, 0), "budget must be a positive number of evaluations"),
    (lambda b, o: ses_search(o, b, 10, popsize=1), "popsize must be an integer >= 2"),
    (lambda b, o: ses_search(o, b, 10, popsize=4, elites=5), r"elites must be an integer in 1..popsize \(4\)"),
    (lambda b, o: ses_search(o, b, 10, levels=6), "6 wavelet levels cannot split a 32x24 noise: db1 allows 1..4"),
    (lambda b, o: random_search(o, np.concatenate([b, b]), 5), "search each prompt separately"),
    (lambda b, o: random_search(o, b * np.nan, 5), "base noise contains NaN"),
    (lambda b, o: random_search(lambda batch: [0.0], b, 5, batch_size=2), "returned 1 scores for 2 candidates"),
])
def test_bad_search_input_is_refused(call, message):
    base, score = _synthetic()
    with pytest.raises(InputError, match=message):
        call(base, lambda batch: [score(z) for z in batch])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD3.5-style generator (the parity case's) and a tiny Diffusion-RM with matching text widths."""
    from ms_rm_parity.generator import _reference

    root = tmp_path_factory.mktemp("search")
    _reference(0, str(root / "pipeline"))
    _, converted = converted_checkpoint(root / "rm")
    rng = np.random.default_rng(0)
    np.savez(root / "embeds.npz", prompt_embeds=rng.standard_normal((1, 7, 48), dtype=np.float32),
             pooled_prompt_embeds=rng.standard_normal((1, 40), dtype=np.float32),
             noise=rng.standard_normal((1, 16, 16, 16), dtype=np.float32))
    return str(root / "pipeline"), converted, str(root / "embeds.npz")


class MeanBrightness:
    """A stand-in pixel reward: the mean of the uint8 images, scaled."""

    input_kind = "pixels"

    def score(self, images, prompts):
        assert len(prompts) == len(images)
        return [float(im.mean()) / 255 for im in images]


def test_objective_scores_latents_directly_and_pixels_after_decoding(tiny):
    from ms_rm.vae.decoder import VAEDecoder
    from ms_rm.vae.encoder import VAEConfig

    pipeline, converted, embeds = tiny
    generator = SD3Generator.from_pretrained(pipeline, mode="pynative")
    rm = DiffusionRM.from_pretrained(converted, mode="pynative")
    with np.load(embeds) as e:
        ehs, pooled, noise = e["prompt_embeds"], e["pooled_prompt_embeds"], e["noise"]
    noises = np.concatenate([noise, -noise])
    objective = GenerateAndScore(generator, ehs, pooled, [(rm, 1.0)], num_inference_steps=2, guidance_scale=1.0)
    scores = objective(noises)
    latents = generator.generate(np.repeat(ehs, 2, 0), np.repeat(pooled, 2, 0), noises, 2, 1.0)
    eps = np.random.default_rng(0).standard_normal((1, 16, 16, 16), dtype=np.float32)
    expected = rm.score(latents, np.repeat(ehs, 2, 0), np.repeat(pooled, 2, 0), u=0.4, noise=np.repeat(eps, 2, 0))
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert scores[0] != scores[1]
    decoder = VAEDecoder(VAEConfig(block_out_channels=(8, 8), latent_channels=16, norm_num_groups=4, layers_per_block=1),
                         mode="pynative")
    shapes = {p.name: p.shape for p in decoder.get_parameters()}
    from ms_rm.core.weights import load_parameters, random_parameter

    load_parameters(decoder, lambda n: random_parameter(n, shapes[n], 0), shapes, "random")
    both = GenerateAndScore(generator, ehs, pooled, [(rm, 1.0), (MeanBrightness(), 2.0)], 2, 1.0, decoder=decoder,
                            prompt="a cat")
    pixels = np.array([float(im.mean()) / 255 for im in decoder.to_images(latents)])
    np.testing.assert_allclose(both(noises), np.asarray(expected) + 2.0 * pixels, rtol=1e-6)
    with pytest.raises(ConfigError, match="scores pixels: pass decoder="):
        GenerateAndScore(generator, ehs, pooled, [(MeanBrightness(), 1.0)])


def test_search_cli_writes_the_best_the_record_and_the_plot(tiny, tmp_path):
    pipeline, converted, embeds = tiny
    out = tmp_path / "ses"
    args = ["search", pipeline, "--reward", converted, "--embeds", embeds, "--method", "ses", "--budget", "7",
            "--popsize", "4", "--elites", "2", "--levels", "2", "--steps", "2", "--guidance", "1", "--out", str(out),
            "--no-progress", "--mode", "pynative"]
    assert cli(args) == 0
    record = json.load(open(out / "record.json"))
    assert len(record["candidates"]) == 7 and len(record["generations"]) == 2
    assert record["best_score"] == max(c["score"] for c in record["candidates"]) == record["best_so_far"][-1]
    with np.load(out / "best.npz") as best:
        generator = SD3Generator.from_pretrained(pipeline, mode="pynative")
        rm = DiffusionRM.from_pretrained(converted, mode="pynative")
        with np.load(embeds) as e:
            objective = GenerateAndScore(generator, e["prompt_embeds"], e["pooled_prompt_embeds"], [(rm, 1.0)], 2, 1.0)
        np.testing.assert_allclose(objective(best["noise"])[0], record["best_score"], rtol=1e-5)
    assert (out / "best_score.png").stat().st_size > 0
    assert cli(args) == 2                                # the output folder exists: refused without --force
    bad = args[:]
    bad[bad.index("--elites") + 1] = "9"
    assert cli(bad + ["--force"]) == 2 and os.path.isdir(out)

"""CLIP scorers (PickScore / CLIP score): parity with transformers, the real vocabulary and the
ViT-H/14 size, MultiScorer next to Diffusion-RM, and bad input."""

import json
import os
import shutil

import numpy as np
import pytest

from helpers import converted_checkpoint, import_extra

transformers = import_extra("transformers", "transformers", "images")
PIL_Image = import_extra("PIL.Image", "pillow", "images")

import mindspore as ms  # noqa: E402
import torch  # noqa: E402

from ms_rm import CheckpointError, ConfigError, InputError, MultiScorer, PickScoreScorer  # noqa: E402
from ms_rm.rewards.clip import CLIPModel, load_clip_config  # noqa: E402
from ms_rm.scoring.clip import CLIPScorer  # noqa: E402
from ms_rm_parity.clip_parity import (open_clip_bpe, write_clip_vocabulary,  # noqa: E402
                                      write_tiny_clip)
from ms_rm_parity.cli import main as parity_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PICKSCORE_CONFIGS = os.path.join(ROOT, "configs", "pickscore")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random transformers CLIPModel folder (laion-like: gelu, real eos id) and the torch model."""
    folder = str(tmp_path_factory.mktemp("clip") / "laion")
    model, tokenizer, processor = write_tiny_clip(folder, "laion", seed=3)
    return folder, model, tokenizer, processor


@pytest.fixture(scope="module")
def scorer(tiny_clip):
    return PickScoreScorer(tiny_clip[0])


def _images(seed=0, sizes=((37, 53), (30, 30))):
    rng = np.random.default_rng(seed)
    return [PIL_Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


# --- parity ------------------------------------------------------------------------------------

def test_parity_case_clip_tiny(tmp_path):
    """`ms-rm parity --case clip-tiny`: pixel values, embeddings, logits, both scores and the pixel
    gradient within the tolerance policy of transformers, graph and PyNative, two model variants."""
    out = tmp_path / "r.json"
    assert parity_main(["--case", "clip-tiny", "--mode", "both", "--json", str(out)]) == 0
    reports = json.loads(out.read_text())["reports"]
    assert len(reports) == 4 and all(r["passed"] for r in reports)
    stages = {s["stage"] for s in reports[0]["stages"]}
    assert {"pixel_values", "image_embeds", "text_embeds", "logits_per_image", "score_cosine", "score_logit",
            "pixels_down_grad", "pixels_up_grad"} <= stages
    pixels = next(s for s in reports[0]["stages"] if s["stage"] == "pixel_values")
    assert pixels["max_abs"] == 0.0                   # CLIPImageProcessor's pixel values, bit for bit


def test_parity_case_clip_tiny_large_weights(tmp_path):
    """`ms-rm parity --case clip-tiny-large-weights`: CLIPModel's matrices 3x its own init (GELU /
    QuickGELU inputs beyond 8, attention logits beyond 10), both variants, PyNative (the cheaper mode
    here), within the policy."""
    out = tmp_path / "r.json"
    assert parity_main(["--case", "clip-tiny-large-weights", "--mode", "pynative", "--json", str(out)]) == 0
    reports = json.loads(out.read_text())["reports"]
    assert [r["case"] for r in reports] == ["clip-tiny-large-weights-openai", "clip-tiny-large-weights-laion"]
    assert all(r["passed"] for r in reports)


def _transformers_logits(model, tokenizer, processor, images, prompts):
    """PickScore's own recipe in transformers (padding to the longest): exp(logit_scale) x cosine."""
    inputs = processor(images=images, return_tensors="pt")
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(**inputs)
        txt = model.get_text_features(**tokens)
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * (txt @ img.T)).diag().numpy()


def test_scores_match_transformers_and_logit_is_scaled_cosine(tiny_clip, scorer):
    folder, model, tokenizer, processor = tiny_clip
    images, prompts = _images(), ["a red cube", "two cats on a table"]
    reference = _transformers_logits(model, tokenizer, processor, images, prompts)
    logit = CLIPScorer(model=scorer.model, processor_path=folder, scale="logit")(images, prompts)
    cosine = scorer(images, prompts)
    np.testing.assert_allclose(logit, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    np.testing.assert_allclose(np.array(logit) / np.array(cosine), np.exp(model.logit_scale.item()), rtol=1e-5)
    assert len(set(np.round(cosine, 6))) == 2         # not constant


def test_batch_splitting_and_input_forms_do_not_change_scores(tiny_clip, scorer):
    images = _images(sizes=((40, 40), (40, 40), (40, 40)))
    prompts = ["a", "the cat", "a dog"]
    whole = scorer(images, prompts)
    split = PickScoreScorer(model=scorer.model, processor_path=tiny_clip[0], max_batch=2)(images, prompts)
    arrays = np.stack([np.asarray(i) for i in images])                     # (B, H, W, 3) uint8
    floats = ms.Tensor(arrays.transpose(0, 3, 1, 2).astype(np.float32) / 255)   # (B, 3, H, W) in [0, 1]
    np.testing.assert_allclose(split, whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scorer(arrays, prompts), whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scorer(floats, prompts), whole, rtol=1e-6, atol=1e-7)


# --- tokenizer and real size ------------------------------------------------------------------------

def test_tokenizer_with_the_real_clip_vocabulary(tmp_path):
    """vocab.json / merges.txt built from open-clip-torch's BPE file (CLIP's simple tokenizer
    algorithm): 49,408 tokens; ms_rm's path (transformers' CLIPTokenizer from the folder) gives
    the ids of transformers' fast (Rust) tokenizer, and CLIP's well-known ids for "a photo of a cat"."""
    bpe = open_clip_bpe(str(tmp_path / "bpe"))          # from the wheel the README's install downloads
    folder = str(tmp_path / "tok")
    write_clip_vocabulary(bpe, folder)
    from ms_rm.rewards.clip import load_tokenizer, tokenize

    tokenizer = load_tokenizer(folder)
    assert len(tokenizer) == 49408
    prompts = ["a photo of a cat", "A Photo of two CATS, on the sofa!", "an astronaut riding a horse on mars, 4k",
               "pickscore's favourite " * 30]
    ids = tokenize(tokenizer, prompts, 77)
    assert ids.shape == (4, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[3, -1] == 49407                                  # truncated, end token kept
    fast = transformers.CLIPTokenizerFast.from_pretrained(folder, from_slow=True)
    reference = fast(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ids, reference)


def test_pickscore_vit_h_config_builds_with_transformers_parameter_count():
    """configs/pickscore (ViT-H/14 PickScore) builds in ms_rm without allocating its 4 GB; the
    parameter count and every name and shape equal transformers' (built on the meta device)."""
    config = load_clip_config(PICKSCORE_CONFIGS)
    ours = {p.name: tuple(p.shape) for p in CLIPModel(config).get_parameters()}
    with torch.device("meta"):
        reference = transformers.CLIPModel(transformers.CLIPConfig.from_pretrained(PICKSCORE_CONFIGS))
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.endswith("position_ids")}
    assert ours == theirs
    assert sum(int(np.prod(s)) for s in ours.values()) == sum(p.numel() for p in reference.parameters()) == 986109441


# --- in MultiScorer, next to Diffusion-RM -------------------------------------------------------------

def test_multiscorer_pickscore_by_name_next_to_diffusion_rm(tmp_path, tiny_clip, scorer):
    _, converted = converted_checkpoint(tmp_path)
    multi = MultiScorer({"diffusion-rm-sd3": 1.0, "pickscore": 0.5},
                        {"diffusion-rm-sd3": {"checkpoint_path": converted, "seed": 0},
                         "pickscore": {"model_path": tiny_clip[0]}})
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 16, 16, 12), dtype=np.float32)     # the tiny SD3.5 case's sizes
    embeds = rng.standard_normal((2, 7, 48), dtype=np.float32)
    pooled = rng.standard_normal((2, 40), dtype=np.float32)
    images, prompts = _images(), ["a red cube", "two cats"]
    out = multi(images, prompts, latents=latents, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    np.testing.assert_allclose(out["pickscore"], scorer(images, prompts), rtol=1e-6)
    np.testing.assert_allclose(out["avg"], np.array(out["diffusion-rm-sd3"]) + 0.5 * np.array(out["pickscore"]),
                               rtol=1e-6)


def test_score_pixels_gradient_against_finite_differences(scorer):
    rng = np.random.default_rng(1)
    pixels = rng.uniform(0.2, 0.8, (1, 3, 32, 40)).astype(np.float32)
    prompts = ["a red cube"]
    grad = ms.grad(lambda x: scorer.score_pixels(x, prompts).sum())(ms.Tensor(pixels)).asnumpy()
    direction = rng.standard_normal(pixels.shape).astype(np.float32)
    eps = 1e-2
    plus = scorer.score_pixels(ms.Tensor(pixels + eps * direction), prompts).asnumpy()[0]
    minus = scorer.score_pixels(ms.Tensor(pixels - eps * direction), prompts).asnumpy()[0]
    numeric = (plus - minus) / (2 * eps)
    assert abs(numeric) > 1e-4
    assert abs(float((grad * direction).sum()) - numeric) < 2e-2 * abs(numeric)


# --- bad input ----------------------------------------------------------------------------------------

def test_non_rgb_images_are_converted_as_clip_image_processor_does(tiny_clip, scorer):
    rgb = _images(sizes=((36, 44),))[0]
    gray, rgba = rgb.convert("L"), rgb.convert("RGBA")
    processor = tiny_clip[3]
    for image in (gray, rgba):
        np.testing.assert_allclose(scorer([image], ["a"]), scorer([image.convert("RGB")], ["a"]), rtol=0)
        theirs = processor(images=[image], return_tensors="np")["pixel_values"]
        from ms_rm.rewards.clip import pixel_values

        np.testing.assert_array_equal(pixel_values(scorer._uint8_images([image]), scorer.processing), theirs)


def test_bad_input_gets_one_line_errors(tiny_clip, scorer, tmp_path):
    folder = tiny_clip[0]
    images = _images()
    cases = [
        (lambda: scorer(images, []), InputError, "prompts is empty"),
        (lambda: scorer(images, ["only one"]), InputError, "2 images and 1 prompts"),
        (lambda: scorer(images, None), InputError, "pass prompts"),
        (lambda: scorer([], []), InputError, "images is empty"),
        (lambda: scorer([np.zeros((8, 8), np.uint8)], ["a"]), InputError, "images[0] must be (H, W, 3)"),
        (lambda: scorer([np.full((8, 8, 3), 2.0, np.float32)], ["a"]), InputError, "must lie in [0, 1]"),
        (lambda: scorer.score_pixels(np.full((1, 3, 8, 8), np.nan, np.float32), ["a"]), InputError, "NaN"),
        (lambda: scorer.score_pixels(np.zeros((1, 4, 8, 8), np.float32), ["a"]), InputError, "(B, 3, H, W)"),
        (lambda: PickScoreScorer(folder, size_policy="crop"), ConfigError, "size_policy must be one of"),
        (lambda: PickScoreScorer(folder, size_policy="error")(images, ["a", "b"]), InputError, "size_policy 'error'"),
        (lambda: PickScoreScorer(folder, scale="softmax"), ConfigError, "scale must be one of"),
        (lambda: scorer.model.encode_images(np.zeros((1, 3, 30, 30), np.float32)), InputError, "(B, 3, 28, 28)"),
    ]
    for call, error, words in cases:
        with pytest.raises(error) as info:
            call()
        message = str(info.value)
        assert words in message and "\n" not in message, message


def test_folder_problems_get_one_line_errors(tiny_clip, tmp_path):
    folder = tiny_clip[0]
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(folder, no_tokenizer)
    os.remove(no_tokenizer / "merges.txt")
    with pytest.raises(ConfigError, match=r"missing merges.txt.*vocab.json and merges.txt"):
        PickScoreScorer(str(no_tokenizer))

    wrong = tmp_path / "wrong_config"                 # a config that contradicts the weights
    shutil.copytree(folder, wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["vision_config"]["intermediate_size"] = 72
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="fc1.weight' has shape"):
        PickScoreScorer(str(wrong))

    no_weights = tmp_path / "no_weights"
    shutil.copytree(folder, no_weights)
    os.remove(no_weights / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json or model.safetensors"):
        PickScoreScorer(str(no_weights))

    no_rgb = tmp_path / "no_rgb"
    shutil.copytree(folder, no_rgb)
    processor = json.loads((no_rgb / "preprocessor_config.json").read_text())
    processor["do_convert_rgb"] = False
    (no_rgb / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(InputError, match="do_convert_rgb=false"):
        PickScoreScorer(str(no_rgb))([_images()[0].convert("L")], ["a"])


def _split_folders(tiny_clip, root):
    """The tiny model, its tokenizer and an image processor of other statistics, each in a folder of
    its own as save_pretrained writes them; ((model, tokenizer, image processor folders), processor)."""
    folder, model, tokenizer, _ = tiny_clip
    paths = [str(root / name) for name in ("model", "tokenizer", "image_processor")]
    os.makedirs(paths[0])
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(folder, name), paths[0])
    tokenizer.save_pretrained(paths[1])
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size=28, image_mean=[0.5, 0.4, 0.3],
                                                image_std=[0.2, 0.25, 0.3])
    processor.save_pretrained(paths[2])
    assert sorted(os.listdir(paths[2])) == ["preprocessor_config.json"]
    return paths, processor


def test_separate_tokenizer_and_image_processor_folders(tiny_clip, scorer, tmp_path):
    """CLIPTokenizer and CLIPImageProcessor saved to folders of their own: the scores are transformers'
    with that processor (not the defaults, not the model folder's), from the scorer and `score-clip`."""
    from ms_rm.cli import main

    (model_dir, tokenizer_dir, processor_dir), processor = _split_folders(tiny_clip, tmp_path)
    images, prompts = _images(), ["a red cube", "two cats on a table"]
    reference = _transformers_logits(tiny_clip[1], tiny_clip[2], processor, images, prompts)
    split = CLIPScorer(model_dir, tokenizer_path=tokenizer_dir, image_processor_path=processor_dir, scale="logit")
    np.testing.assert_allclose(split(images, prompts), reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    with_model = CLIPScorer(model=scorer.model, tokenizer_path=tokenizer_dir, image_processor_path=processor_dir,
                            scale="logit")
    np.testing.assert_allclose(with_model(images, prompts), split(images, prompts), rtol=1e-6)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    out = tmp_path / "scores.jsonl"
    args = ["score-clip", model_dir, "--tokenizer", tokenizer_dir, "--image-processor", processor_dir, "--scale",
            "logit", "--out", str(out), "--no-progress", "--mode", "pynative"]
    for path, prompt in zip(paths, prompts):
        args += ["--image", path, "--prompt", prompt]
    assert main(args) == 0
    scores = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    np.testing.assert_allclose(scores, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


def test_a_missing_preprocessor_config_is_an_error_not_the_defaults(tiny_clip, tmp_path):
    (model_dir, tokenizer_dir, processor_dir), _ = _split_folders(tiny_clip, tmp_path)
    for kwargs in (dict(processor_path=tokenizer_dir), dict(tokenizer_path=tokenizer_dir),
                   dict(tokenizer_path=tokenizer_dir, image_processor_path=tokenizer_dir)):
        with pytest.raises(ConfigError) as info:
            CLIPScorer(model_dir, mode="pynative", **kwargs)
        message = str(info.value)
        assert "no preprocessor_config.json" in message and "image_processor_path" in message, message
        assert "\n" not in message
    with pytest.raises(ConfigError, match="with model=, pass processor_path .* or tokenizer_path and "
                                          "image_processor_path"):
        CLIPScorer(model=object(), tokenizer_path=tokenizer_dir)


def test_cli_score_clip_scores_image_files(tiny_clip, scorer, tmp_path, capsys):
    from ms_rm.cli import main

    images, prompts = _images(), ["a red cube", "two cats"]
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    out = tmp_path / "scores.jsonl"
    args = ["score-clip", tiny_clip[0], "--out", str(out), "--no-progress", "--scale", "logit"]
    for path, prompt in zip(paths, prompts):
        args += ["--image", path, "--prompt", prompt]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = CLIPScorer(model=scorer.model, processor_path=tiny_clip[0], scale="logit")(images, prompts)
    np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-6)
    assert [r["image"] for r in rows] == paths
    assert main(["score-clip", tiny_clip[0], "--image", paths[0]]) == 2            # a prompt per image
    assert "one --prompt per --image" in capsys.readouterr().err

"""The aesthetic predictor (LAION improved aesthetic predictor): parity with transformers' CLIPModel and
image-reward's AestheticScore MLP, the released ViT-L/14 + MLP size, the converter and its errors,
both preprocessings, the scorer in the registry, MultiScorer (Diffusion-RM 0.6, aesthetic 0.2,
PickScore 0.2) and the command line."""

import json
import os

import numpy as np
import pytest

from helpers import converted_checkpoint, import_extra

transformers = import_extra("transformers", "transformers", "images")
PIL_Image = import_extra("PIL.Image", "pillow", "images")

import mindspore as ms  # noqa: E402
import torch  # noqa: E402

from ms_rm import CheckpointError, ConfigError, InputError, MultiScorer  # noqa: E402
from ms_rm.rewards import REWARD_MODELS, load_reward_model  # noqa: E402
from ms_rm.rewards.aesthetic import Aesthetic, AestheticConfig  # noqa: E402
from ms_rm.scoring.aesthetic import AestheticScorer  # noqa: E402
from ms_rm.scoring.scorers import SCORERS  # noqa: E402
from ms_rm_parity.aesthetic_parity import load_aesthetic_module, sample_images, write_tiny_aesthetic  # noqa: E402
from ms_rm_parity.cli import main as parity_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED = os.path.join(ROOT, "configs", "aesthetic")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny CLIP folder + the package MLP's .pth, converted: (root, clip folder, .pth, converted, torch parts)."""
    root = tmp_path_factory.mktemp("aesthetic")
    clip_folder, pth, model, mlp, processor = write_tiny_aesthetic(str(root), seed=2)
    converted = Aesthetic.convert(pth, clip_folder, str(root / "converted"), progress=False)
    return dict(root=root, clip=clip_folder, pth=pth, converted=converted, model=model, mlp=mlp, processor=processor)


@pytest.fixture(scope="module")
def scorer(tiny):
    return AestheticScorer(tiny["converted"])


# --- parity ------------------------------------------------------------------------------------------

def test_parity_case_aesthetic_tiny(tmp_path):
    """`ms-rm parity --case aesthetic-tiny`: pixel values (RGB, L, RGBA of several sizes) bit for bit,
    features, unit features, scores and the pixel gradients within the tolerance policy, compiled."""
    out = tmp_path / "r.json"
    assert parity_main(["--case", "aesthetic-tiny", "--mode", "graph", "--json", str(out)]) == 0
    (report,) = json.loads(out.read_text())["reports"]
    stages = {s["stage"]: s for s in report["stages"]}
    assert report["passed"]
    assert {"pixel_values", "image_features", "unit_features", "score", "pixels_down_grad",
            "pixels_up_grad"} <= set(stages)
    assert stages["pixel_values"]["max_abs"] == 0.0            # CLIPImageProcessor's pixel values, bit for bit


def test_parity_case_aesthetic_large_weights_and_listed(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert parity_main(["--case", "aesthetic-tiny-large-weights", "--mode", "pynative", "--json", str(out)]) == 0
    assert all(r["passed"] for r in json.loads(out.read_text())["reports"])
    capsys.readouterr()
    assert parity_main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "aesthetic-tiny " in listed and "aesthetic-tiny-large-weights" in listed


def test_scores_follow_the_reference_formula_and_vary(tiny, scorer):
    """The scorer against the formula computed here with the reference's parts: CLIPProcessor's pixel
    values, transformers' get_image_features, / L2 norm, the package's MLP; and not a constant."""
    images = sample_images(5)
    with torch.no_grad():
        values = tiny["processor"](images=images, return_tensors="pt")["pixel_values"]
        features = tiny["model"].float().get_image_features(pixel_values=values)
        reference = tiny["mlp"].float()(features / features.norm(dim=-1, keepdim=True))[:, 0].numpy()
    ours = np.array(scorer(images))
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())
    assert np.ptp(ours) > 10 * 1e-5 * np.abs(reference).max()


def test_input_forms_and_batch_splitting_do_not_change_scores(tiny, scorer):
    rng = np.random.default_rng(3)
    arrays = rng.integers(0, 256, (3, 40, 44, 3), dtype=np.uint8)
    whole = scorer([PIL_Image.fromarray(a) for a in arrays])
    floats = ms.Tensor(arrays.transpose(0, 3, 1, 2).astype(np.float32) / 255)     # the trainer's (B, 3, H, W)
    np.testing.assert_allclose(scorer(arrays), whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scorer(floats, ["ignored"] * 3), whole, rtol=1e-6, atol=1e-7)
    split = AestheticScorer(model=scorer.model, max_batch=2)(arrays)
    np.testing.assert_allclose(split, whole, rtol=1e-6, atol=1e-7)
    model = load_reward_model(tiny["converted"])
    np.testing.assert_allclose(model.score([PIL_Image.fromarray(a) for a in arrays]), whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model.score(arrays, ["p"] * 3), whole, rtol=1e-6, atol=1e-7)   # a search's batch


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_clip_preprocessing_is_clipimageprocessors_bit_for_bit(tiny, scorer, mode):
    """Flow-GRPO-MS's path: scorer.preprocess equals CLIPImageProcessor's pixel values exactly, on images of
    odd, portrait, landscape, exact and smaller-than-the-crop sizes in each mode."""
    rng = np.random.default_rng(len(mode))
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    images = []
    for h, w in ((37, 53), (64, 41), (28, 28), (19, 75), (101, 30)):
        array = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        images.append(PIL_Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode))
    reference = np.stack([tiny["processor"](images=i, return_tensors="np")["pixel_values"][0] for i in images])
    np.testing.assert_array_equal(scorer.preprocess(images), reference)


def _imagereward_transform(image, size, mean, std):
    """ImageReward's AestheticScore preprocessing (OpenAI CLIP's torchvision transform), written out
    here from torchvision's documented semantics (torchvision cannot be installed beside the CPU torch):
    Resize(size, BICUBIC) on the PIL image in its own mode, CenterCrop(size) at int(round((n - size) / 2)),
    convert("RGB"), ToTensor (uint8 / 255 in float32), Normalize."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    resized = image.resize((new_w, new_h), PIL_Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    crop = resized.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float().div(255)
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)).numpy()


def test_imagereward_preprocessing_is_the_packages_transform_and_differs_from_clipprocessor(scorer):
    images = sample_images(7) + [PIL_Image.fromarray(np.random.default_rng(1).integers(0, 256, (29, 31, 4),
                                                                                       dtype=np.uint8), "RGBA")]
    processing = scorer.model.config.processing
    ours = AestheticScorer(model=scorer.model, preprocess="imagereward").preprocess(images)
    reference = np.stack([_imagereward_transform(i, 28, processing.mean, processing.std) for i in images])
    np.testing.assert_array_equal(ours, reference)
    assert not np.array_equal(ours, scorer.preprocess(images))      # the two preprocessings do differ


def test_score_pixels_gradient_against_finite_differences(scorer):
    rng = np.random.default_rng(1)
    pixels = rng.uniform(0.2, 0.8, (1, 3, 32, 40)).astype(np.float32)
    grad = ms.grad(lambda x: scorer.score_pixels(x).sum())(ms.Tensor(pixels)).asnumpy()
    direction = rng.standard_normal(pixels.shape).astype(np.float32)
    eps = 1e-2
    up = scorer.score_pixels(ms.Tensor(pixels + eps * direction)).asnumpy()[0]
    down = scorer.score_pixels(ms.Tensor(pixels - eps * direction)).asnumpy()[0]
    fd = (float(up) - float(down)) / (2 * eps)
    np.testing.assert_allclose((grad * direction).sum(), fd, rtol=2e-2, atol=1e-6)
    # a trainer's loss: the images made inside it, the resize tensors prepared from their shape (ReFL's way)
    model = scorer.model
    rest = model.prepare_pixels((1, 3, 32, 40))[1:]

    def loss(x):
        return 2 - model.forward_pixels(x * 1.0, *rest).mean()

    np.testing.assert_allclose(ms.grad(ms.jit(loss))(ms.Tensor(pixels)).asnumpy(), -grad, rtol=1e-5, atol=1e-9)
    with pytest.raises(InputError, match="shape must be"):
        model.prepare_pixels((1, 4, 32, 40))


# --- the released size ----------------------------------------------------------------------------------

def test_released_vit_l14_and_mlp_build_with_the_references_parameter_counts():
    """configs/aesthetic (openai/clip-vit-large-patch14's config) + the released MLP widths build in ms_rm
    without weights; names and shapes equal transformers' CLIPVisionModelWithProjection (meta device)
    and the package's MLP(768)."""
    with open(os.path.join(RELEASED, "config.json")) as f:
        clip_dict = json.load(f)
    with open(os.path.join(RELEASED, "preprocessor_config.json")) as f:
        processing = json.load(f)
    config = AestheticConfig.build(clip_dict, processing, (1024, 128, 64, 16), RELEASED)
    ours = Aesthetic.parameter_shapes(config)
    with torch.device("meta"):
        tower = transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(**clip_dict["vision_config"]))
        mlp = load_aesthetic_module().MLP(768)
    theirs = {k: tuple(v.shape) for k, v in tower.state_dict().items() if not k.endswith("position_ids")}
    theirs.update({f"mlp.{k}": tuple(v.shape) for k, v in mlp.state_dict().items()})
    assert ours == theirs
    count = sum(int(np.prod(s)) for s in ours.values())
    assert count == sum(p.numel() for p in tower.parameters()) + sum(p.numel() for p in mlp.parameters())
    # 768*1024+1024 + 1024*128+128 + 128*64+64 + 64*16+16 + 16+1
    assert sum(int(np.prod(s)) for n, s in ours.items() if n.startswith("mlp.")) == 927_969


# --- converter errors -------------------------------------------------------------------------------------

def _pth(tiny, path, edit):
    state = dict(torch.load(tiny["pth"], weights_only=True))
    edit(state)
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("layers.4.bias"), "1 missing keys: layers.4.bias"),
    (lambda s: s.update({"layers.8.extra": torch.zeros(1)}), "1 unexpected keys: layers.8.extra"),
    (lambda s: s.update({"layers.2.weight": torch.zeros(128, 1000)}), "'layers.0.weight' has 1024 outputs but "
                                                                      "'layers.2.weight' takes 1000 inputs"),
    (lambda s: s.update({"layers.2.bias": torch.zeros(7)}), "'layers.2.bias' has shape (7,), the model expects (128,)"),
    (lambda s: s.update({"layers.7.weight": torch.zeros(2, 16), "layers.7.bias": torch.zeros(2)}),
     "has 2 outputs, expected 1"),
    (lambda s: [s.update({f"mlp.{k}": s.pop(k)}) for k in list(s)], "no 'layers.N.weight' tensors"),
])
def test_a_wrong_pth_is_a_one_line_error_naming_its_keys(tiny, tmp_path, edit, message):
    pth = _pth(tiny, tmp_path / "bad.pth", edit)
    with pytest.raises(CheckpointError) as error:
        Aesthetic.convert(pth, tiny["clip"], str(tmp_path / "out"), progress=False)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_clip_folder_of_the_wrong_width_and_other_bad_sources(tiny, tmp_path):
    pth = _pth(tiny, tmp_path / "narrow.pth", lambda s: s.update({"layers.0.weight": torch.zeros(1024, 16)}))
    with pytest.raises(CheckpointError, match=r"takes 16 features .* projection_dim 24") as error:
        Aesthetic.convert(pth, tiny["clip"], str(tmp_path / "out"), progress=False)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="not a folder"):
        Aesthetic.convert(tiny["pth"], str(tmp_path / "nowhere"), str(tmp_path / "out"), progress=False)
    (tmp_path / "notpth.pth").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="notpth.pth: (cannot read|refused)"):
        Aesthetic.convert(str(tmp_path / "notpth.pth"), tiny["clip"], str(tmp_path / "out"), progress=False)
    empty = tmp_path / "noproc"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(tiny["clip"], "config.json")).read())
    with pytest.raises(ConfigError, match="no preprocessor_config.json"):
        Aesthetic.convert(tiny["pth"], str(empty), str(tmp_path / "out"), progress=False)


def test_converted_folder_records_both_sources_and_unused_text_tower(tiny):
    with open(os.path.join(tiny["converted"], "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["format"] == "ms_rm.aesthetic" and len(manifest["sources"]) == 2
    unused = manifest["unused"]["clip"]
    assert "logit_scale" in unused and "text_projection.weight" in unused
    assert any(k.startswith("text_model.") for k in unused)
    assert manifest["tensors"]["mlp.layers.7.weight"]["from"] == "aesthetic.pth:layers.7.weight"


def test_unreadable_images_and_bad_inputs_are_one_line_errors(scorer, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="broken.png: cannot read the image"):
        scorer([str(tmp_path / "broken.png")])
    with pytest.raises(InputError, match="image file not found"):
        scorer([str(tmp_path / "missing.png")])
    with pytest.raises(InputError, match=r"float images must lie in \[0, 1\]"):
        scorer([np.full((30, 30, 3), 2.0, np.float32)])
    with pytest.raises(InputError, match=r"pixels must be \(B, 3, H, W\)"):
        scorer.score_pixels(ms.Tensor(np.zeros((1, 30, 30), np.float32)))
    with pytest.raises(ConfigError, match="preprocess must be one of"):
        AestheticScorer(model=scorer.model, preprocess="torchvision")


def test_do_convert_rgb_false_refuses_non_rgb_images(tiny, tmp_path):
    processor_folder = tmp_path / "no-rgb"
    processor_folder.mkdir()
    with open(os.path.join(tiny["clip"], "preprocessor_config.json")) as f:
        settings = dict(json.load(f), do_convert_rgb=False)
    (processor_folder / "preprocessor_config.json").write_text(json.dumps(settings))
    out = Aesthetic.convert(tiny["pth"], tiny["clip"], str(tmp_path / "c"), image_processor=str(processor_folder),
                            progress=False)
    strict = AestheticScorer(out, mode="pynative")
    gray = PIL_Image.fromarray(np.zeros((30, 30), np.uint8), mode="L")
    with pytest.raises(InputError, match="images\\[0\\] is a L image .* do_convert_rgb=false"):
        strict([gray])
    assert len(strict([gray.convert("RGB")])) == 1


# --- registry, command line, MultiScorer --------------------------------------------------------------------

def test_registered_as_reward_model_and_scorer_and_in_the_flow_grpo_names():
    from ms_rm.integrations.flow_grpo import flow_grpo_name

    assert REWARD_MODELS["aesthetic"] is Aesthetic and SCORERS["aesthetic"] is AestheticScorer
    assert flow_grpo_name("aesthetic") == "ms-rm-aesthetic"


def test_convert_and_score_from_the_command_line(tiny, tmp_path, capsys):
    from ms_rm.cli import main as cli

    out = str(tmp_path / "cli-converted")
    assert cli(["convert", "--reward", "aesthetic", tiny["pth"], tiny["clip"], "--out", out, "--no-progress"]) == 0
    image = tmp_path / "a.png"
    PIL_Image.fromarray(np.random.default_rng(0).integers(0, 256, (33, 41, 3), dtype=np.uint8)).save(image)
    capsys.readouterr()
    assert cli(["score", "--reward", "aesthetic", out, "--image", str(image), "--prompt", "", "--no-progress"]) == 0
    printed = float(capsys.readouterr().out.split()[0])
    np.testing.assert_allclose(printed, AestheticScorer(out)([str(image)])[0], atol=1e-6)


def test_multiscorer_diffusion_rm_aesthetic_pickscore_as_in_the_docs(tmp_path, tiny):
    """docs/flow-grpo-ms.md's combination: Diffusion-RM 0.6, aesthetic 0.2, PickScore 0.2, ms_rm's scorers
    alone, on tiny models; avg is the weighted sum of the three."""
    _, diffusion_rm = converted_checkpoint(tmp_path)
    from ms_rm_parity.clip_parity import write_tiny_clip

    pickscore = str(tmp_path / "pickscore")
    write_tiny_clip(pickscore, "laion", seed=4)
    multi = MultiScorer({"diffusion-rm-sd3": 0.6, "aesthetic": 0.2, "pickscore": 0.2},
                        {"diffusion-rm-sd3": {"checkpoint_path": diffusion_rm, "seed": 0, "mode": "pynative"},
                         "aesthetic": {"checkpoint_path": tiny["converted"], "mode": "pynative"},
                         "pickscore": {"model_path": pickscore, "mode": "pynative"}})
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 16, 16, 12), dtype=np.float32)          # the tiny SD3.5 case's sizes
    embeds = rng.standard_normal((2, 7, 48), dtype=np.float32)
    pooled = rng.standard_normal((2, 40), dtype=np.float32)
    images = [PIL_Image.fromarray(a) for a in rng.integers(0, 256, (2, 30, 36, 3), dtype=np.uint8)]
    out = multi(images, ["a red cube", "two cats"], latents=latents, prompt_embeds=embeds,
                pooled_prompt_embeds=pooled)
    assert set(out) == {"diffusion-rm-sd3", "aesthetic", "pickscore", "avg"}
    np.testing.assert_allclose(out["aesthetic"], AestheticScorer(tiny["converted"])(images), rtol=1e-6)
    expected = sum(w * np.array(out[n]) for n, w in (("diffusion-rm-sd3", 0.6), ("aesthetic", 0.2), ("pickscore", 0.2)))
    np.testing.assert_allclose(out["avg"], expected, rtol=1e-6)


def test_ms_rm_aesthetic_inside_a_flow_grpo_ms_fork(tiny, scorer, tmp_path, monkeypatch):
    """Registered with a stand-in of zhtmike's Flow-GRPO-MS (test_flow_grpo's), `ms-rm-aesthetic` is built by
    the fork's own MultiScorer and scores the trainer's (B, 3, H, W) float batch as the scorer does."""
    import importlib

    from test_flow_grpo import _drop_flow_grpo, _stand_in

    from ms_rm.integrations import flow_grpo as integration

    _drop_flow_grpo()
    monkeypatch.syspath_prepend(_stand_in(tmp_path, "zhtmike"))
    try:
        multi = importlib.import_module("flow_grpo.scorer.multi")
        integration.register({"ms-rm-aesthetic": {"checkpoint_path": tiny["converted"]}})
        reward_fn = multi.MultiScorer({"ms-rm-aesthetic": 1.0})
        images = np.random.default_rng(4).uniform(0, 1, (2, 3, 30, 34)).astype(np.float32)
        details = reward_fn(images, ["a", "b"])
        np.testing.assert_allclose(details["ms-rm-aesthetic"], scorer(images), rtol=1e-6)
    finally:
        _drop_flow_grpo()


def test_a_noise_search_takes_the_model_as_a_pixel_reward(tiny, scorer):
    """ms_rm.search's GenerateAndScore scores the decoded uint8 (K, H, W, 3) images with Aesthetic.score
    (stand-ins for the generator and the decoder: the search's own tests cover those)."""
    from ms_rm.search.objectives import GenerateAndScore

    images = np.random.default_rng(6).integers(0, 256, (3, 32, 36, 3), dtype=np.uint8)

    class Generator:
        def generate(self, ehs, pooled, noises, *rest):
            return noises

    class Decoder:
        def to_images(self, latents):
            return images[: latents.shape[0]]

    model = load_reward_model(tiny["converted"])
    objective = GenerateAndScore(Generator(), np.zeros((1, 7, 48), np.float32), np.zeros((1, 40), np.float32),
                                 [(model, 0.5)], decoder=Decoder(), prompt="a cat")
    scores = objective(np.zeros((3, 16, 4, 4), np.float32))
    np.testing.assert_allclose(scores, 0.5 * np.array(scorer(list(images))), rtol=1e-6)

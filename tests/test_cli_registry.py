"""`ms-rm score --reward NAME` and `ms-rm convert --reward NAME` over the reward-model registry:
each registered model's command gives what its older per-model command gives, the help lists
every registered model, an unknown name is a one-line error, and a model registered here (not
in ms_rm.cli) gets both commands."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from ms_rm import REWARD_MODELS, RewardModel, load_reward_model
from ms_rm.cli import main
from ms_rm_parity.cases import CASES

from helpers import converted_checkpoint, reference_checkpoint


def _run(capsys, args):
    """(exit status, stdout) of `ms-rm ARGS`."""
    capsys.readouterr()
    status = main(args)
    return status, capsys.readouterr().out


def _images(root, sizes=((40, 56), (32, 32))):
    rng = np.random.default_rng(2)
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(str(root / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _pairs(paths, prompts=("a red cube", "the blue sky")):
    args = []
    for path, prompt in zip(paths, prompts):
        args += ["--image", path, "--prompt", prompt]
    return args


def _sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --- every registered model: the registry command is its older command --------------------------

def test_score_latents_is_the_old_score_command(tmp_path, capsys):
    _, model = converted_checkpoint(tmp_path, CASES["tiny-sd35"])
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "in.npz", latents=rng.standard_normal((2, 16, 8, 8), dtype=np.float32),
             encoder_hidden_states=rng.standard_normal((2, 5, 48), dtype=np.float32),
             pooled_projections=rng.standard_normal((2, 40), dtype=np.float32),
             noise=rng.standard_normal((2, 16, 8, 8), dtype=np.float32))
    outputs = {}
    for name, selectors in {"old": [], "reward": ["--reward", "diffusion-rm"],
                            "both": ["--input-kind", "latents", "--reward", "diffusion-rm"]}.items():
        out = str(tmp_path / f"{name}.npz")
        status, printed = _run(capsys, ["score", *selectors, model, "--inputs", str(tmp_path / "in.npz"),
                                        "--u", "0.4", "--out", out, "--mode", "pynative"])
        assert status == 0
        outputs[name] = printed, dict(np.load(out))
    assert len(outputs["old"][0].splitlines()) == 2
    for name in ("reward", "both"):
        assert outputs[name][0] == outputs["old"][0]
        assert outputs[name][1].keys() == outputs["old"][1].keys()
        for key, value in outputs["old"][1].items():
            np.testing.assert_array_equal(outputs[name][1][key], value)


def test_score_pixels_of_diffusion_rm_is_score_images(tmp_path, capsys):
    from ms_rm_parity.text_reference import write_sd3_text_folder
    from ms_rm_parity.vae_reference import build_reference_vae, tiny_vae_config

    _, model = converted_checkpoint(tmp_path, CASES["tiny-sd35"])
    pipeline = tmp_path / "pipeline"
    write_sd3_text_folder(str(pipeline), seed=3, t5_width=48, clip_widths=(16, 24))
    build_reference_vae(tiny_vae_config(latent_channels=16), seed=4).save_pretrained(str(pipeline / "vae"),
                                                                                      safe_serialization=True)
    common = [model, "--vae", str(pipeline / "vae"), *_pairs(_images(tmp_path, ((32, 32), (32, 48)))),
              "--seed", "5", "--no-progress", "--mode", "pynative", "--max-sequence-length", "12"]
    old = _run(capsys, ["score-images", *common])
    new = _run(capsys, ["score", "--reward", "diffusion-rm", "--input-kind", "pixels", *common])
    assert old[0] == new[0] == 0 and new[1] == old[1] and len(old[1].splitlines()) == 2


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from ms_rm_parity.clip_parity import write_tiny_clip

    folder = str(tmp_path_factory.mktemp("clip") / "laion")
    write_tiny_clip(folder, "laion", seed=3)
    return folder


def test_score_clip_is_score_clip(tiny_clip, tmp_path, capsys):
    common = [tiny_clip, *_pairs(_images(tmp_path)), "--scale", "logit", "--no-progress", "--mode", "pynative"]
    old = _run(capsys, ["score-clip", *common, "--out", str(tmp_path / "old.jsonl")])
    new = _run(capsys, ["score", "--reward", "clip", *common, "--out", str(tmp_path / "new.jsonl")])
    assert old[0] == new[0] == 0 and new[1] == old[1] and len(old[1].splitlines()) == 2
    assert (tmp_path / "new.jsonl").read_text() == (tmp_path / "old.jsonl").read_text()


def test_clip_is_a_registered_reward_model(tiny_clip, tmp_path, capsys):
    """load_reward_model finds a Hugging Face CLIPModel folder by its config.json; nothing to convert."""
    from ms_rm.rewards.clip import CLIPModel, load_tokenizer, pixel_values, tokenize
    from ms_rm.rewards.clip.config import load_image_processing

    cls = REWARD_MODELS["clip"]
    assert cls is CLIPModel and cls.input_kind == "pixels" and cls.format_name == "ms_rm.clip"
    model = load_reward_model(tiny_clip, mode="pynative")
    assert isinstance(model, CLIPModel) and isinstance(model, RewardModel)
    images = [Image.open(p) for p in _images(tmp_path)]
    pixels = pixel_values([np.asarray(i.convert("RGB")) for i in images],
                          load_image_processing(tiny_clip, model.config.vision.image_size))
    ids = tokenize(load_tokenizer(tiny_clip), ["a red cube", "the blue sky"], model.config.text.max_position_embeddings)
    cosine = np.sum(model.encode_images(pixels).asnumpy() * model.encode_text(ids).asnumpy(), axis=-1)
    np.testing.assert_allclose(model.score(pixels, ids), cosine, rtol=1e-6)
    assert set(cls.parameter_shapes(model.config)) == {p.name for p in model.get_parameters()}
    capsys.readouterr()
    assert main(["convert", "--reward", "clip", tiny_clip, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs no conversion" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def imagereward_pt(tmp_path_factory):
    from test_imagereward import _need_package

    _need_package()
    from ms_rm.rewards.imagereward import tiny_config
    from ms_rm_parity.imagereward_reference import build_reference, save_checkpoint

    root = tmp_path_factory.mktemp("imagereward")
    config = root / "config.json"
    config.write_text(json.dumps(tiny_config().to_dict()))
    return save_checkpoint(build_reference(tiny_config(), seed=0), str(root / "ImageReward.pt")), str(config)


def test_imagereward_convert_and_score_are_the_old_commands(imagereward_pt, tmp_path, capsys):
    from test_imagereward import _vocab_folder

    src, config = imagereward_pt
    old = _run(capsys, ["convert-imagereward", src, "--config", config, "--out", str(tmp_path / "old"),
                        "--no-progress"])
    new = _run(capsys, ["convert", "--reward", "imagereward", src, "--config", config, "--out", str(tmp_path / "new"),
                        "--no-progress"])
    assert old[0] == new[0] == 0 and [o.strip() for o in (old[1], new[1])] == [str(tmp_path / "old"),
                                                                                   str(tmp_path / "new")]
    for name in ("model.safetensors", "ms_rm_config.json"):
        assert _sha256(tmp_path / "old" / name) == _sha256(tmp_path / "new" / name)
    common = [str(tmp_path / "new"), "--tokenizer", _vocab_folder(tmp_path), *_pairs(_images(tmp_path)),
              "--no-progress", "--mode", "pynative"]
    old = _run(capsys, ["score-imagereward", *common])
    new = _run(capsys, ["score", "--reward", "imagereward", *common])
    assert old[0] == new[0] == 0 and new[1] == old[1] and len(old[1].splitlines()) == 2


def test_convert_diffusion_rm_is_the_old_convert(tmp_path, capsys):
    paths = reference_checkpoint(tmp_path / "reference", seed=1)
    common = [paths.src, "--transformer", paths.transformer, "--scheduler", paths.scheduler, "--no-progress"]
    assert _run(capsys, ["convert", *common, "--out", str(tmp_path / "old")])[0] == 0
    assert _run(capsys, ["convert", "--reward", "diffusion-rm", *common, "--out", str(tmp_path / "new")])[0] == 0
    for name in ("model.safetensors", "ms_rm_config.json"):
        assert _sha256(tmp_path / "old" / name) == _sha256(tmp_path / "new" / name)


# --- help and errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["score", "convert"])
def test_help_lists_every_registered_model(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--reward" in text and all(name in text for name in REWARD_MODELS)


@pytest.mark.parametrize("args, wanted", [
    (["score", "--reward", "clip"], ["--processor", "--scale", "--image", "--pairs"]),
    (["score", "--reward", "imagereward"], ["--tokenizer", "--image"]),
    (["score", "--reward", "diffusion-rm", "--input-kind", "pixels"], ["--vae", "--text-encoders", "--size-policy"]),
    (["score", "--reward", "diffusion-rm"], ["--inputs", "--features"]),
    (["convert", "--reward", "imagereward"], ["src", "--config", "--dtype"]),
    (["convert", "--reward", "diffusion-rm"], ["--transformer", "--scheduler", "--u-convention"]),
])
def test_help_of_one_model_shows_its_arguments(args, wanted, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and all(w in text for w in wanted), text


@pytest.mark.parametrize("args, message", [
    (["score", "--reward", "nope", "model"], "unknown reward model 'nope'; registered: "),
    (["convert", "--reward=nope"], "unknown reward model 'nope'; registered: "),
    (["score", "model", "--reward"], "--reward: name a reward model: "),
    (["score", "--reward", "clip", "--input-kind", "latents", "m"], "clip scores pixels, not latents"),
])
def test_bad_reward_names_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    if "registered" in message:
        assert all(name in err for name in REWARD_MODELS)


def test_old_score_and_convert_parse_as_before():
    """No --reward: the Namespace of the commands before the registry (plus reward=None)."""
    from ms_rm.cli import build_parser, convert, score

    args = build_parser().parse_args(["score", "m", "--inputs", "i.npz", "--u", "0.1", "0.2", "--out", "o.npz"])
    assert args.func is score.run and args.reward is None and args.input_kind == "latents"
    assert (args.model, args.inputs, args.u, args.out, args.mode) == ("m", "i.npz", [0.1, 0.2], "o.npz", "graph")
    args = build_parser().parse_args(["convert", "s", "--transformer", "t", "--scheduler", "c", "--out", "o"])
    assert args.func is convert.run and args.dtype == "keep" and args.u_convention == "sigma"


# --- a model registered outside ms_rm.cli gets both commands ------------------------------------

class PixelMean:
    """A pixels reward model: the mean of each image times `scale` (from its folder's scale.txt)."""

    name, input_kind, format_name = "pixel-mean", "pixels", "ms_rm.pixel_mean"
    converted = []

    def __init__(self, scale):
        self.scale = scale

    @classmethod
    def from_pretrained(cls, path, dtype=None, mode="graph", verify=False):
        return cls(float(open(os.path.join(path, "scale.txt")).read()))

    @classmethod
    def convert(cls, src, out, scale=1.0, force=False, progress=True):
        """Write a folder holding `scale` (src: any file).

        More words that --help leaves out."""
        cls.converted.append(dict(src=src, out=out, scale=scale, force=force, progress=progress))
        os.makedirs(out)
        with open(os.path.join(out, "scale.txt"), "w") as f:
            f.write(str(scale))
        return out

    @classmethod
    def parameter_shapes(cls, config):
        return {}

    def reward(self, images, prompts):
        return [self.scale * float(np.asarray(image, np.float32).mean()) for image in images]

    def score(self, images, prompts):
        return self.reward(images, prompts)


class LatentsToo(PixelMean):
    name, input_kind, format_name = "latents-too", "latents", "ms_rm.latents_too"


def test_a_newly_registered_model_gets_both_commands(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(REWARD_MODELS, PixelMean.name, PixelMean)
    monkeypatch.setitem(REWARD_MODELS, LatentsToo.name, LatentsToo)
    for command in ("score", "convert"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "pixel-mean" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["convert", "--reward", "pixel-mean", "--help"])
    text = capsys.readouterr().out
    assert all(w in text for w in ("src", "--out", "--scale", "--force", "--no-progress", "Write a folder holding"))
    with pytest.raises(SystemExit):
        main(["score", "--reward", "latents-too", "--help"])
    assert "--inputs" in capsys.readouterr().out                       # a latents model: the .npz form

    status, printed = _run(capsys, ["convert", "--reward", "pixel-mean", "any.pt", "--out", str(tmp_path / "m"),
                                    "--scale", "0.5", "--no-progress"])
    assert status == 0 and printed.strip() == str(tmp_path / "m")
    assert PixelMean.converted == [dict(src="any.pt", out=str(tmp_path / "m"), scale=0.5, force=False, progress=False)]
    paths = _images(tmp_path)
    status, printed = _run(capsys, ["score", "--reward", "pixel-mean", str(tmp_path / "m"), *_pairs(paths),
                                    "--no-progress", "--out", str(tmp_path / "s.jsonl")])
    expected = [0.5 * float(np.asarray(Image.open(p), np.float32).mean()) for p in paths]
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert status == 0 and [r["image"] for r in rows] == paths
    np.testing.assert_allclose([r["score"] for r in rows], expected, rtol=1e-5)
    assert printed.splitlines() == [f"{r['score']:.6f}\t{r['image']}" for r in rows]

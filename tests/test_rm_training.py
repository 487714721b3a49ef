"""Training a Diffusion-RM (issue 29): the optimizer and losses against torch and the formulas, a run
through `ms-rm train-rm` with its checkpoints (the reference's layout) and a bit-exact resume, the
checkpoint read back by ms-rm convert and by the torch reference, one compile per graph, bad input, and
the steps against the reference's own TrainingEngine when its checkout is present."""

import collections
import json
import math
import os

import numpy as np
import pytest
import torch

from ms_rm_parity.cases import Case, TINY_SD35

from helpers import reference_checkpoint

BASE_CONFIG = {"model": {"model_type": "thurstone"},
               "training": {"learning_rate": "1e-3", "weight_decay": 0.01, "max_grad_norm": 1.0, "add_noise": True,
                            "t_weighting_scheme": "uniform", "t_weighting_scheme_param": 0.0},
               "logging": {"eval_frac": 2, "save_frac": 2}, "system": {"seed": 3}}


# --- formulas and the optimizer ------------------------------------------------------------------------
def test_adamw_equals_torch_adamw_after_clip_grad_norm():
    from mindspore import Parameter, Tensor

    from ms_rm.training.optim import AdamW

    rng = np.random.default_rng(0)
    shapes = [(16, 8), (8,), (3, 16)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ours = [Parameter(Tensor(a), name=f"p{i}") for i, a in enumerate(init)]
    theirs = [torch.nn.Parameter(torch.tensor(a)) for a in init]
    optimizer = AdamW(ours, lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)
    reference = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.01)
    for step in range(6):                       # clipping active on odd steps (norm ~ 100), inactive on even ones
        grads = [(rng.standard_normal(s) * (30.0 if step % 2 else 0.01)).astype(np.float32) for s in shapes]
        norm = optimizer.step([Tensor(g) for g in grads])
        for t, g in zip(theirs, grads):
            t.grad = torch.tensor(g)
        reference_norm = float(torch.nn.utils.clip_grad_norm_(theirs, 1.0))
        reference.step()
        assert norm == pytest.approx(reference_norm, rel=1e-6)
        for p, t in zip(ours, theirs):
            np.testing.assert_allclose(p.asnumpy(), t.detach().numpy(), rtol=0, atol=2e-7)
    state = optimizer.state()
    assert int(state["step"]) == 6
    np.testing.assert_allclose(state["exp_avg_sq.p0"], reference.state[theirs[0]]["exp_avg_sq"].numpy(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["thurstone", "thurstone-constant", "bt", "bt-margin"])
def test_losses_are_the_reference_formulas(kind):
    from mindspore import Tensor

    from ms_rm.training.preference import preference_loss

    rng = np.random.default_rng(1)
    chosen, rejected = rng.standard_normal((5, 1)) * 3, rng.standard_normal((5, 1)) * 3     # deltas up to ~10
    sigma = rng.uniform(0, 1, 5)
    delta = (chosen - rejected)[:, 0]
    if kind.startswith("bt"):
        d = delta - (1.0 if kind == "bt-margin" else 0.0)
        expected = np.mean([math.log1p(math.exp(-x)) if x > 0 else -x + math.log1p(math.exp(x)) for x in d])
    else:
        var = 2 * sigma ** 2 + 0.05 if kind == "thurstone" else np.full(5, 0.5)
        p = np.array([0.5 * (1 + math.erf(x / math.sqrt(2 * v + 1e-6) / math.sqrt(2))) for x, v in zip(delta, var)])
        expected = np.mean(1 - np.sqrt(p + 1e-6))
    c32, r32, s32 = (a.astype(np.float32) for a in (chosen, rejected, sigma))
    got = float(preference_loss(kind, Tensor(c32), Tensor(r32), Tensor(s32)).asnumpy())
    # float32 itself: 1 + erf(x) cancels for delta << 0, which sqrt(p + 1e-6) magnifies (torch alike)
    assert got == pytest.approx(expected, rel=1e-4)
    # torch in float32, as the reference's compute_loss spells it
    c, r, s = (torch.from_numpy(a) for a in (c32, r32, s32))
    if kind.startswith("bt"):
        theirs = -torch.nn.functional.logsigmoid(c - r - (1.0 if kind == "bt-margin" else 0.0)).mean()
    else:
        var = 2.0 * s.reshape(-1, 1) ** 2 + 0.05 if kind == "thurstone" else 0.5
        p = torch.distributions.Normal(0, 1).cdf((c - r) / ((var + var + 1e-6) ** 0.5))
        theirs = (1.0 - torch.sqrt(p + 1e-6)).mean()
    assert got == pytest.approx(float(theirs), rel=2e-6, abs=1e-7)


def test_u_schemes_draw_their_distributions_and_refuse_bad_parameters():
    from ms_rm.core.errors import ConfigError
    from ms_rm.training.preference import sample_u

    rng = np.random.default_rng(0)
    assert abs(sample_u(rng, "uniform", 0, 20000).mean() - 0.5) < 0.01
    logit = sample_u(rng, "logit_normal", "0_1", 20000)
    assert abs(np.median(logit) - 0.5) < 0.01 and 0.19 < logit.std() < 0.23       # sigmoid(N(0, 1)): std 0.208
    assert abs(sample_u(rng, "beta", "2_5", 20000).mean() - 2 / 7) < 0.01
    assert abs(sample_u(rng, "power", "2", 20000).mean() - 1 / 3) < 0.01
    assert np.all(sample_u(rng, "constant", "0.3", 4) == np.float32(0.3))
    for scheme, param in (("logit_normal", "0"), ("beta", "0_1"), ("constant", "2"), ("cosmic", 0), ("mode", "x")):
        with pytest.raises(ConfigError):
            sample_u(rng, scheme, param, 2)


def test_state_dicts_written_without_torch_read_back_in_torch(tmp_path):
    from ms_rm.io.torch_file import write_state_dict

    bf16 = torch.randn(2, 3).bfloat16()
    arrays = {"a.weight": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
              "scalar": np.float32(2.5).reshape(()), "half": np.ones((2, 2), np.float16),
              "empty": np.zeros((0, 3), np.float32), "bf16": bf16.view(torch.int16).numpy().view(np.dtype("bfloat16"))}
    path = write_state_dict(str(tmp_path / "rm_head.pt"), arrays)
    for mmap in (False, True):
        state = torch.load(path, weights_only=True, mmap=mmap)
        assert list(state) == list(arrays)
        for key, value in arrays.items():
            assert tuple(state[key].shape) == value.shape
            np.testing.assert_array_equal(state[key].float().numpy(), value.astype(np.float32))
    assert torch.equal(state["bf16"], bf16)


# --- a run -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny reference checkpoint (its transformer is the base), 8 training pairs and 4 held-out ones
    as .npy latents (chosen and rejected drawn from different distributions), prompt embeddings, and
    the run config."""
    root = tmp_path_factory.mktemp("rm_train")
    paths = reference_checkpoint(root / "reference", Case("t", ""))
    model = json.load(open(os.path.join(paths.src, "config.json")))["model"]
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir()
    lines = {"train": [], "val": []}
    for i in range(12):
        split = "train" if i < 8 else "val"
        np.save(data / f"c{i}.npy", (rng.standard_normal((16, 16, 12)) + 0.5).astype(np.float32))
        np.save(data / f"r{i}.npy", (rng.standard_normal((16, 16, 12)) * 0.5 - 0.5).astype(np.float32))
        lines[split].append(json.dumps({"prompt": f"prompt {i % 3}", "chosen": f"c{i}.npy", "rejected": f"r{i}.npy"}))
    for split, rows in lines.items():
        (data / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    np.savez(root / "prompts.npz", prompts=np.array([f"prompt {k}" for k in range(3)]),
             encoder_hidden_states=rng.standard_normal((3, 7, TINY_SD35["joint_attention_dim"])).astype(np.float32),
             pooled_projections=rng.standard_normal((3, TINY_SD35["pooled_projection_dim"])).astype(np.float32))
    config = json.loads(json.dumps(BASE_CONFIG))
    config["model"] = dict(model, model_type="thurstone")
    config["data"] = {"train": {"pairs": "data/train.jsonl", "base_batch_size": 2, "seed": 5},
                      "eval": {"held_out": {"pairs": "data/val.jsonl"}}}
    (root / "config.json").write_text(json.dumps(config))
    return {"root": root, "paths": paths, "config": root / "config.json"}


def _train(tiny_run, out, *extra):
    from ms_rm.cli import main

    paths = tiny_run["paths"]
    return main(["train-rm", str(tiny_run["config"]), "--transformer", paths.transformer, "--scheduler",
                 paths.scheduler, "--prompt-embeddings", str(tiny_run["root"] / "prompts.npz"), "--out", str(out),
                 "--no-progress", *extra])


def _arrays(path):
    from ms_rm.io.safetensors_file import SafetensorsFile

    file = SafetensorsFile(path)
    try:
        return {k: file.read(k) for k in file.keys()}
    finally:
        file.close()


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """A run of 4 steps (checkpoints at 2 and 4) of the tiny model, through `ms-rm train-rm`."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert _train(tiny_run, out, "--max-steps", "4") == 0
    return out


def test_a_run_checkpoints_in_the_reference_layout_and_resumes_bit_for_bit(tiny_run, trained, tmp_path):
    assert _train(tiny_run, tmp_path / "halves", "--max-steps", "2") == 0
    assert _train(tiny_run, tmp_path / "halves", "--max-steps", "4", "--resume") == 0
    whole, halves = (trained / "checkpoints" / "step_00004", tmp_path / "halves" / "checkpoints" / "step_00004")
    assert sorted(os.listdir(whole)) == ["backbone_lora", "config.json", "rm_head.pt", "trainer_state"]
    for relative in ("backbone_lora/adapter_model.safetensors", "trainer_state/head.safetensors",
                     "trainer_state/optimizer.safetensors"):
        a, b = _arrays(str(whole / relative)), _arrays(str(halves / relative))
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{relative}: {key}")
    state = json.load(open(whole / "trainer_state" / "state.json"))
    resumed = json.load(open(halves / "trainer_state" / "state.json"))
    assert state["history"] == resumed["history"] and state["step"] == 4
    assert set(state["history"][1]["validation"]) == {"0.3", "0.4", "0.5"}
    head = torch.load(whole / "rm_head.pt", weights_only=True)
    assert all(not k.startswith("reward_head.") for k in head) and "eta3" not in head
    # the trained LoRA really moved and the head too (the update is not a no-op)
    start = _arrays(os.path.join(tiny_run["paths"].src, "checkpoint", "backbone_lora", "adapter_model.safetensors"))
    trained = _arrays(str(whole / "backbone_lora" / "adapter_model.safetensors"))
    assert sorted(start) != [] and all(np.abs(trained[k] - start[k]).max() > 0 for k in start if k in trained)


def test_a_checkpoint_converts_and_scores_as_the_torch_reference_reads_it(tiny_run, trained, tmp_path):
    from ms_rm import DiffusionRM
    from ms_rm_parity.compare import max_rel_error
    from ms_rm_parity.reference import load_reference_model, lookup_u

    step = trained / "checkpoints" / "step_00002"
    paths = tiny_run["paths"]
    converted = DiffusionRM.convert(str(step), paths.transformer, paths.scheduler, str(tmp_path / "converted"),
                                    config=str(step / "config.json"), progress=False)
    model = DiffusionRM.from_pretrained(converted)
    rng = np.random.default_rng(4)
    latents = rng.standard_normal((2, 16, 16, 12)).astype(np.float32)
    noise = rng.standard_normal(latents.shape).astype(np.float32)
    ehs = rng.standard_normal((2, 7, 48)).astype(np.float32)
    pooled = rng.standard_normal((2, 40)).astype(np.float32)
    ours = model.reward(latents, ehs, pooled, u=0.4, noise=noise).asnumpy()
    torch_model, rm_config, scheduler_config = load_reference_model(str(step), paths.transformer, paths.scheduler,
                                                                    config=str(step / "config.json"))
    sigma, timestep = lookup_u(scheduler_config, [0.4, 0.4], "sigma")
    put = lambda a: torch.from_numpy(a)
    with torch.no_grad():
        theirs = torch_model.stages(put(latents), put(noise), sigma, timestep, put(ehs), put(pooled))["reward"]
    assert max_rel_error(ours, theirs) < 1e-4


def test_a_run_compiles_its_step_and_its_update_once(tiny_run, tmp_path, monkeypatch):
    from ms_rm.core import compile_cache
    from ms_rm.evaluation.data import read_pairs
    from ms_rm.io.files import read_config_file
    from ms_rm.training import optim, rm_trainer
    from ms_rm.training.rm_model import build_trainee
    from ms_rm.training.rm_trainer import RMTrainSettings, train_reward_model

    counted = collections.Counter()

    class CountingJit(compile_cache.jit):
        def __call__(self, *args):
            before = len(self._seen)
            result = super().__call__(*args)
            counted[self.name] += len(self._seen) - before
            return result

    monkeypatch.setattr(rm_trainer, "jit", CountingJit)
    monkeypatch.setattr(optim, "jit", CountingJit)
    config = read_config_file(str(tiny_run["config"]))
    paths = tiny_run["paths"]
    trainee = build_trainee(config, paths.transformer, paths.scheduler, seed=0)
    pairs = read_pairs(str(tiny_run["root"] / "data" / "train.jsonl"))
    table = np.load(tiny_run["root"] / "prompts.npz")
    index = {p: i for i, p in enumerate(table["prompts"].tolist())}
    text = lambda prompts: {"encoder_hidden_states": table["encoder_hidden_states"][[index[p] for p in prompts]],
                            "pooled_projections": table["pooled_projections"][[index[p] for p in prompts]]}
    settings = RMTrainSettings.from_config(dict(config, training=dict(config["training"], max_steps=3)))
    history = train_reward_model(trainee, settings, pairs, text, str(tmp_path / "run"), config, progress=False)
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)
    assert dict(counted) == {"rm_loss_and_grads": 1, "adamw_step": 1}, dict(counted)


# --- bad input -------------------------------------------------------------------------------------------
def test_bad_input_gets_one_line_errors_naming_the_file(tiny_run, tmp_path, capsys):
    root = tiny_run["root"]
    data = root / "data"
    np.save(data / "small.npy", np.zeros((16, 8, 8), np.float32))
    bad_nan = np.zeros((16, 16, 12), np.float32)
    bad_nan[0, 0, 0] = np.nan
    np.save(data / "nan.npy", bad_nan)
    cases = {
        "shapes": ('{"prompt": "prompt 0", "chosen": "c0.npy", "rejected": "small.npy"}', "differ in shape"),
        "nan": ('{"prompt": "prompt 0", "chosen": "nan.npy", "rejected": "r0.npy"}', "NaN"),
        "missing": ('{"prompt": "prompt 0", "chosen": "c0.npy"}', "rejected"),
        "empty": ("", "empty"),
    }
    for name, (line, message) in cases.items():
        (data / f"{name}.jsonl").write_text(line + "\n")
        config = json.loads(tiny_run["config"].read_text())
        config["data"]["train"]["pairs"] = f"data/{name}.jsonl"
        path = root / f"config_{name}.json"
        path.write_text(json.dumps(config))
        assert _train(dict(tiny_run, config=path), tmp_path / name) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (name, err)
    # a starting checkpoint of another model than the config's
    config = json.loads(tiny_run["config"].read_text())
    config["model"]["visual_head_idx"] = [1, 3]
    (root / "config_other.json").write_text(json.dumps(config))
    assert _train(dict(tiny_run, config=root / "config_other.json"), tmp_path / "other", "--start",
                  os.path.join(tiny_run["paths"].src, "checkpoint"), "--start-config",
                  os.path.join(tiny_run["paths"].src, "config.json")) == 2
    assert "another model" in capsys.readouterr().err
    # resume: of a folder that holds no run, and with other settings
    assert _train(tiny_run, tmp_path / "nothing", "--resume") == 2
    assert "not a ms_rm training run" in capsys.readouterr().err
    assert _train(tiny_run, tmp_path / "run", "--max-steps", "2") == 0
    config = json.loads(tiny_run["config"].read_text())
    config["training"]["learning_rate"] = "2e-3"
    (root / "config_lr.json").write_text(json.dumps(config))
    assert _train(dict(tiny_run, config=root / "config_lr.json"), tmp_path / "run", "--resume") == 2
    assert "other settings (lr)" in capsys.readouterr().err
    assert _train(tiny_run, tmp_path / "run", "--max-steps", "2") == 2            # an existing run is not overwritten
    assert "--resume continues it" in capsys.readouterr().err


# --- against the reference's engine ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", ["rm-train-thurstone", "rm-train-no-noise"])
def test_steps_equal_the_reference_training_engine(case):
    from ms_rm_parity import rm_train_parity

    try:
        rm_train_parity.reference_source()
    except ImportError as e:
        pytest.skip(str(e))
    (report,) = rm_train_parity.run_rm_train_case(case, ["graph"], "fp32", 0, "CPU", "cpu")
    assert report.passed, report.first_failure()
    stages = {r.stage: r for r in report.stages}
    assert stages["step3:update (significant gradients)"].cosine > 0.9999


def test_image_pairs_are_encoded_once_into_latent_pairs(tmp_path):
    from PIL import Image

    from ms_rm.evaluation.data import read_pairs
    from ms_rm.scoring.images import load_image, preprocess
    from ms_rm.training.rm_trainer import encode_image_pairs, read_training_pairs
    from ms_rm.vae.encoder import load_vae_encoder
    from ms_rm.core.errors import InputError
    from ms_rm_parity.vae_reference import build_reference_vae, tiny_vae_config

    torch.manual_seed(0)
    build_reference_vae(tiny_vae_config(), seed=0).save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "pairs.jsonl").write_text(
        '{"prompt": "x", "chosen": "a.png", "rejected": "b.png"}\n{"prompt": "y", "chosen": "c.png", "rejected": "a.png"}\n')
    with pytest.raises(InputError, match="pass --vae"):
        read_training_pairs([str(tmp_path / "pairs.jsonl")])
    pairs = read_training_pairs([str(tmp_path / "pairs.jsonl")], images=True)
    vae = load_vae_encoder(str(tmp_path / "vae"), mode="pynative")
    latent_pairs = encode_image_pairs(pairs, vae, str(tmp_path / "latents"), progress=False)
    files = sorted(os.listdir(tmp_path / "latents"))
    assert files == ["0000000.npy", "0000001.npy", "0000002.npy", "index.json", "pairs.jsonl"]   # a.png once
    expected = vae.encode(preprocess([load_image(str(tmp_path / "c.png"))], "bucket")[0][None]).asnumpy()[0]
    np.testing.assert_array_equal(np.load(latent_pairs[1].chosen.path), expected)
    assert latent_pairs[1].rejected.path == latent_pairs[0].chosen.path
    again = read_pairs(str(tmp_path / "latents" / "pairs.jsonl"))
    assert [p.chosen.path for p in again] == [p.chosen.path for p in latent_pairs]
    stamp = os.path.getmtime(tmp_path / "latents" / "0000000.npy")
    encode_image_pairs(pairs, vae, str(tmp_path / "latents"), progress=False)                    # kept, not redone
    assert os.path.getmtime(tmp_path / "latents" / "0000000.npy") == stamp


def test_data_parallel_training_equals_one_process(tiny_run, tmp_path):
    from helpers import msrun, ms_rm_command

    # AdamW's first steps are sign(gradient) x lr: an element whose gradient is within rounding of zero
    # steps +-lr by how one machine rounds it. adam_epsilon = 1 (above every gradient element: the norm is
    # clipped to 1) makes the update a smooth function of the gradient, lr ~ g / (1 + |g|), so the updates
    # of the two runs differ as their gradients do: the float32 rounding of two half-batch sums against
    # one whole sum. lr 1 keeps those updates far above the float32 spacing of the parameters they move.
    config = json.load(open(tiny_run["config"]))
    config["training"].update(adam_epsilon=1.0, learning_rate=1.0)
    (tiny_run["root"] / "config_smooth.json").write_text(json.dumps(config))      # beside its data
    smooth = dict(tiny_run, config=tiny_run["root"] / "config_smooth.json")
    paths = tiny_run["paths"]
    common = ["train-rm", str(smooth["config"]), "--transformer", paths.transformer, "--scheduler", paths.scheduler,
              "--prompt-embeddings", str(tiny_run["root"] / "prompts.npz"), "--max-steps", "2", "--no-progress"]
    assert _train(smooth, tmp_path / "one", "--max-steps", "2") == 0
    code, logs = msrun(ms_rm_command(), *common, "--out", tmp_path / "two", log_dir=tmp_path / "logs")
    assert code == 0, logs[-3000:]
    one, two = (json.load(open(tmp_path / run / "checkpoints" / "step_00002" / "trainer_state" / "state.json"))
                for run in ("one", "two"))
    assert len(one["history"]) == len(two["history"]) == 2
    for a, b in zip(one["history"], two["history"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]) + 1e-7, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (a, b)
    from ms_rm.io.files import read_config_file
    from ms_rm.training.rm_model import build_trainee

    start = build_trainee(read_config_file(str(smooth["config"])), paths.transformer, paths.scheduler,
                          seed=5).lora_state()     # data.train.seed
    lora = "checkpoints/step_00002/backbone_lora/adapter_model.safetensors"
    ours, theirs = _arrays(str(tmp_path / "one" / lora)), _arrays(str(tmp_path / "two" / lora))
    a = np.concatenate([(ours[k] - start[k]).ravel() for k in sorted(start)]).astype(np.float64)
    b = np.concatenate([(theirs[k] - start[k]).ravel() for k in sorted(start)]).astype(np.float64)
    gap = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert np.linalg.norm(a) > 0 and gap < 1e-4, f"the two-worker update differs from one process's by {gap:.2e}"


@pytest.mark.slow
def test_it_learns_a_synthetic_preference(tmp_path):
    from ms_rm_parity.rm_learning import learning_run

    history = learning_run(str(tmp_path), steps=12, eval_every=12, shift=0.04, seed=0)
    before, after = history[0]["validation"], history[-1]["validation"]
    assert np.mean([v["accuracy"] for v in before.values()]) < 0.7                   # an untrained head: near chance
    assert all(v["accuracy"] > 0.9 for v in after.values()), after
    assert all(after[u]["loss"] < before[u]["loss"] for u in after)

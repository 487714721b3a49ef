"""ms_rm's scorers inside Flow-GRPO-MS (ms_rm.integrations.flow_grpo), with both forks' scorer code.

The stand-ins below reproduce, in our own code, what the two public forks' `flow_grpo.scorer`
packages do (their `Scorer` base, `AVAILABLE_SCORERS`, and `MultiScorer`):
* zyd-ustc: `MultiScorer(scorers, scorer_configs)`; a ready scorer only when it is an instance of
  its `Scorer` (anything else is unpacked as `cls(**config)`); `diffusion-rm-sd3` is its own scorer;
* zhtmike: `MultiScorer(scorers)`; every scorer is `cls()`.
Set MS_RM_FLOW_GRPO_CHECKOUTS=/path/zyd:/path/zhtmike (checkouts of the real forks) to run the same
tests against the real code as well (the closing note of issue 15 reports that run).
"""

import importlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ms_rm import ConfigError, DiffusionRM, InputError
from ms_rm.integrations import flow_grpo as integration
from ms_rm.integrations.flow_grpo import launcher
from ms_rm.scoring import DiffusionRMSD3Scorer

from helpers import ROOT, converted_checkpoint

B = 2

SCORER_PY = '''
from abc import ABC, abstractmethod


class Scorer(ABC):
    @abstractmethod
    def __call__(self, images, prompts=None):
        """scores of the images"""
'''

# the weighted sum both forks' MultiScorer.__call__ computes
MULTI_CALL = '''
    def __call__(self, images, prompts=None):
        details, total = {}, []
        for name, weight in self.scorers.items():
            scores = self.score_fn[name](images, prompts=prompts)
            details[name] = scores
            weighted = [weight * s for s in scores]
            total = weighted if not total else [a + b for a, b in zip(total, weighted)]
        details["avg"] = total
        return details
'''

MULTI_PY = {
    "zyd": '''
import importlib
from .scorer import Scorer

AVAILABLE_SCORERS = {"diffusion-rm-sd3": ("diffusion_rm", "DiffusionRMSD3Scorer")}


class MultiScorer(Scorer):
    def __init__(self, scorers, scorer_configs=None):
        self.scorers, self.configs, self.score_fn = scorers, scorer_configs or {}, {}
        for name in scorers:
            given = self.configs.get(name)
            if isinstance(given, Scorer):
                self.score_fn[name] = given
                continue
            module, cls = AVAILABLE_SCORERS[name]
            cls = getattr(importlib.import_module("flow_grpo.scorer." + module), cls)
            self.score_fn[name] = cls(**given) if name in self.configs else cls()
''' + MULTI_CALL,
    "zhtmike": '''
import importlib
from .scorer import Scorer

AVAILABLE_SCORERS = {"jpeg-compressibility": ("compression", "JpegCompressibilityScorer")}


class MultiScorer(Scorer):
    def __init__(self, scorers):
        self.scorers, self.score_fn = scorers, {}
        for name in scorers:
            module, cls = AVAILABLE_SCORERS[name]
            self.score_fn[name] = getattr(importlib.import_module("flow_grpo.scorer." + module), cls)()
''' + MULTI_CALL,
}


def _add_pixel_scorer(multi):
    """A pixel scorer in the fork's registry, as the fork's own would be: it sees the images as a
    list (one score per image: its index)."""
    base = sys.modules["flow_grpo.scorer.scorer"].Scorer

    class CountScorer(base):
        def __call__(self, images, prompts=None):
            assert isinstance(images, list), type(images)
            return [float(i) for i in range(len(images))]

    module = type(sys)("flow_grpo.scorer.count")
    module.CountScorer = CountScorer
    sys.modules[module.__name__] = module
    multi.AVAILABLE_SCORERS["batch-size"] = ("count", "CountScorer")


def _stand_in(root, fork):
    package = root / fork / "flow_grpo"
    (package / "scorer").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "scorer" / "__init__.py").write_text("from .multi import AVAILABLE_SCORERS, MultiScorer\n")
    (package / "scorer" / "scorer.py").write_text(SCORER_PY)
    (package / "scorer" / "multi.py").write_text(MULTI_PY[fork])
    return str(root / fork)


def _forks(root):
    forks = [(fork, _stand_in(root, fork)) for fork in ("zyd", "zhtmike")]
    for checkout in filter(None, os.environ.get("MS_RM_FLOW_GRPO_CHECKOUTS", "").split(os.pathsep)):
        forks.append((f"real:{os.path.basename(checkout.rstrip('/'))}", checkout))
    return forks


def _drop_flow_grpo():
    for name in [n for n in sys.modules if n == "flow_grpo" or n.startswith("flow_grpo.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def fork_roots(tmp_path_factory):
    return dict(_forks(tmp_path_factory.mktemp("forks")))


@pytest.fixture(params=["zyd", "zhtmike"] + [f"real:{os.path.basename(c.rstrip('/'))}" for c in filter(
    None, os.environ.get("MS_RM_FLOW_GRPO_CHECKOUTS", "").split(os.pathsep))])
def fork(request, fork_roots, monkeypatch):
    """(name, flow_grpo.scorer.multi) of one fork, importable for the test's duration."""
    _drop_flow_grpo()
    monkeypatch.syspath_prepend(fork_roots[request.param])
    multi = importlib.import_module("flow_grpo.scorer.multi")
    _add_pixel_scorer(multi)
    yield request.param, multi
    _drop_flow_grpo()


def _takes_configs(multi) -> bool:
    return "scorer_configs" in multi.MultiScorer.__init__.__code__.co_varnames


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny reference checkpoint converted under the sigma and the index conventions."""
    root = tmp_path_factory.mktemp("ckpt")
    paths, sigma = converted_checkpoint(root)
    index = DiffusionRM.convert(paths.src, paths.transformer, paths.scheduler, str(root / "converted-index"),
                                u_convention="index", progress=False)
    return dict(paths=paths, sigma=sigma, index=index, config=os.path.join(paths.src, "config.json"))


@pytest.fixture(scope="module")
def batch(checkpoints):
    backbone = DiffusionRM.from_pretrained(checkpoints["sigma"]).config.backbone
    rng = np.random.default_rng(3)
    return dict(latents=rng.standard_normal((B, backbone.in_channels, 8, 8), dtype=np.float32),
                ehs=rng.standard_normal((B, 6, backbone.joint_attention_dim), dtype=np.float32),
                pooled=rng.standard_normal((B, backbone.pooled_projection_dim), dtype=np.float32))


def _expected(folder, batch, u, **kw):
    """The ms_rm scorer's own numbers for the same settings (what the registered scorer must return)."""
    scorer = DiffusionRMSD3Scorer(folder, u=u, normalize="flow-grpo-ms", seed=11, noise="fixed", **kw)
    return scorer.score_latents(batch["latents"], batch["ehs"], batch["pooled"])


def _build(multi, scorers, configs):
    return multi.MultiScorer(scorers, configs) if _takes_configs(multi) else multi.MultiScorer(scorers)


def test_registered_defaults_build_the_scorer_in_each_fork(fork, checkpoints, batch):
    name, multi = fork
    integration.register({"ms-rm-sd3": {"checkpoint_path": checkpoints["sigma"], "u": 0.4, "u_convention": "sigma",
                                        "seed": 11, "noise": "fixed"}})
    assert multi.AVAILABLE_SCORERS["ms-rm-sd3"] == ("ms_rm", "MsRmSd3Scorer")
    if name == "zyd":                                  # Flow-GRPO-MS's own scorer keeps its name
        assert multi.AVAILABLE_SCORERS["diffusion-rm-sd3"] == ("diffusion_rm", "DiffusionRMSD3Scorer")
    reward_fn = _build(multi, {"ms-rm-sd3": 1.0, "batch-size": 0.5}, {})
    images = [object() for _ in range(B)]              # what a pixel scorer would see
    details = reward_fn(integration.with_latents(images, batch["latents"], batch["ehs"], batch["pooled"]),
                        ["a cat", "a dog"])
    expected = _expected(checkpoints["sigma"], batch, 0.4)
    np.testing.assert_array_equal(details["ms-rm-sd3"], expected)
    assert details["batch-size"] == [0.0, 1.0]
    np.testing.assert_allclose(details["avg"], np.float64(expected) + 0.5 * np.arange(B))


def test_the_trainers_configuration_as_it_is(fork, checkpoints, batch):
    """zyd's trainer passes checkpoint_path, config_path, u (index convention) and its pipeline."""
    name, multi = fork
    integration.register({"ms-rm-sd3": {"seed": 11, "noise": "fixed"}})
    pipeline = _Pipeline(batch)
    config = {"checkpoint_path": checkpoints["index"], "config_path": checkpoints["config"], "u": 0.9,
              "pipeline": pipeline}
    if not _takes_configs(multi):                      # zhtmike: no configurations at all
        with pytest.raises(TypeError):
            multi.MultiScorer({"ms-rm-sd3": 1.0}, {"ms-rm-sd3": config})
        return
    reward_fn = multi.MultiScorer({"ms-rm-sd3": 1.0}, {"ms-rm-sd3": config})
    latents = batch["latents"]                         # output_type="latent": the images ARE the latents
    scores = reward_fn(latents, None)["ms-rm-sd3"]
    assert pipeline.prompts == [""] * B                # no prompts: scored against ""
    np.testing.assert_array_equal(scores, _expected(checkpoints["index"], batch, 0.9))
    # the same u under the sigma checkpoint is refused, not reinterpreted, also when the registered
    # defaults carry a sigma-convention u of their own: the trainer's u is Flow-GRPO-MS's (index)
    integration.register({"ms-rm-sd3": {"u": 0.4, "u_convention": "sigma"}})
    with pytest.raises(ConfigError, match="u 0.9 is given under the 'index' convention"):
        multi.MultiScorer({"ms-rm-sd3": 1.0}, {"ms-rm-sd3": {**config, "checkpoint_path": checkpoints["sigma"]}})
    # without any u, an index checkpoint takes Flow-GRPO-MS's default u = 0.9
    integration.register({"ms-rm-sd3": {"seed": 11, "noise": "fixed"}})
    no_u = {k: v for k, v in config.items() if k != "u"}
    scores = multi.MultiScorer({"ms-rm-sd3": 1.0}, {"ms-rm-sd3": no_u})(latents, None)["ms-rm-sd3"]
    np.testing.assert_array_equal(scores, _expected(checkpoints["index"], batch, 0.9))


def test_the_zyd_trainers_pipeline_not_its_default_model(fork, checkpoints, batch):
    """zyd-ustc's trainer (scripts/train_sd3.py at f2f8585) gives `pipeline`, its own pipeline object,
    to diffusion-rm-sd3 only; every other name it configures gets `pipeline_path = --diffusion-rm-
    pipeline-path or --model`, by default the hub id below, which ms_rm does not download. Given the
    trainer's pipeline, the scorer uses it, whatever pipeline_path says."""
    name, multi = fork
    if not _takes_configs(multi):                      # zhtmike: no configurations, no pipeline
        return
    integration.register({"ms-rm-sd3": {"seed": 11, "noise": "fixed"}})
    config = {"checkpoint_path": checkpoints["index"], "config_path": checkpoints["config"], "u": 0.9}
    default_model = "stabilityai/stable-diffusion-3.5-medium"
    with pytest.raises(ConfigError, match=r"not a local folder .* give this scorer the trainer's own pipeline .*"
                                          r"if reward_name in \[\"diffusion-rm-sd3\", \"ms-rm-sd3\"\]"):
        multi.MultiScorer({"ms-rm-sd3": 1.0}, {"ms-rm-sd3": {**config, "pipeline_path": default_model}})
    for given in ({"pipeline": _Pipeline(batch)}, {"pipeline": _Pipeline(batch), "pipeline_path": default_model}):
        reward_fn = multi.MultiScorer({"ms-rm-sd3": 1.0}, {"ms-rm-sd3": {**config, **given}})
        scores = reward_fn(batch["latents"], ["a", "b"])["ms-rm-sd3"]    # prompts through the trainer's pipeline
        assert given["pipeline"].prompts == ["a", "b"]
        np.testing.assert_array_equal(scores, _expected(checkpoints["index"], batch, 0.9))


def test_ready_instances_must_be_the_forks_scorer_type(fork, checkpoints):
    name, multi = fork
    classes = integration.register({})
    ready = classes["ms-rm-sd3"](checkpoint_path=checkpoints["sigma"])
    assert isinstance(ready, sys.modules["flow_grpo.scorer.scorer"].Scorer)
    if not _takes_configs(multi):                      # zhtmike: no ready scorers either
        with pytest.raises(TypeError):
            multi.MultiScorer({"ms-rm-sd3": 1.0}, {"ms-rm-sd3": ready})
        return
    assert multi.MultiScorer({"ms-rm-sd3": 1.0}, {"ms-rm-sd3": ready}).score_fn["ms-rm-sd3"] is ready
    # what the issue measured: ms_rm's plain scorer is not the fork's Scorer type
    with pytest.raises(TypeError, match="mapping"):
        multi.MultiScorer({"ms-rm-sd3": 1.0}, {"ms-rm-sd3": DiffusionRMSD3Scorer(checkpoints["sigma"])})


def test_errors_name_the_fix(fork, checkpoints, batch, tmp_path):
    name, multi = fork
    integration.register({})
    with pytest.raises(ConfigError, match="no checkpoint_path: register it"):
        _build(multi, {"ms-rm-sd3": 1.0}, {})
    classes = integration.register({})
    with pytest.raises(ConfigError, match="not a folder written by ms-rm convert"):
        classes["ms-rm-sd3"](checkpoint_path=checkpoints["paths"].src)
    edited = json.load(open(checkpoints["config"]))
    edited["model"]["num_transformer_layers"] -= 1
    edited_path = tmp_path / "config.json"
    edited_path.write_text(json.dumps(edited))
    with pytest.raises(ConfigError, match="num_transformer_layers"):
        classes["ms-rm-sd3"](checkpoint_path=checkpoints["sigma"], config_path=str(edited_path))
    registry = dict(multi.AVAILABLE_SCORERS)
    with pytest.raises(ConfigError, match="names no ms_rm scorer"):
        integration.register({"ms-rm-sd4": {}})
    assert multi.AVAILABLE_SCORERS == registry                     # an error changes nothing
    with pytest.raises(InputError, match="2 images and 3 prompts"):
        classes["ms-rm-sd3"](checkpoint_path=checkpoints["sigma"], pipeline=_Pipeline(None))(
            batch["latents"], ["a", "b", "c"])


def test_not_importable_is_one_clear_error():
    _drop_flow_grpo()
    with pytest.raises(ConfigError, match="Flow-GRPO-MS is not importable"):
        integration.register({})


def test_the_launcher_runs_a_trainer_script_unchanged(fork_roots, checkpoints, batch, tmp_path, monkeypatch):
    """The script parses --reward with choices=AVAILABLE_SCORERS.keys(), as both trainers do."""
    _drop_flow_grpo()
    monkeypatch.syspath_prepend(fork_roots["zhtmike"])
    np.save(tmp_path / "latents.npy", batch["latents"])
    np.save(tmp_path / "ehs.npy", batch["ehs"])
    np.save(tmp_path / "pooled.npy", batch["pooled"])
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f'''
        import argparse, json, numpy as np
        from flow_grpo.scorer import AVAILABLE_SCORERS, MultiScorer
        from ms_rm.integrations.flow_grpo import with_latents
        parser = argparse.ArgumentParser()
        parser.add_argument("--reward", nargs="+", choices=AVAILABLE_SCORERS.keys(), required=True)
        args = parser.parse_args()
        reward_fn = MultiScorer(dict.fromkeys(args.reward, 1.0))
        d = "{tmp_path}"
        batch = with_latents(None, np.load(d + "/latents.npy"), np.load(d + "/ehs.npy"), np.load(d + "/pooled.npy"))
        json.dump(reward_fn(batch, ["x", "y"]), open(d + "/rewards.json", "w"))
    '''))
    (tmp_path / "scorers.yaml").write_text(f"ms-rm-sd3:\n  checkpoint_path: {checkpoints['sigma']}\n  u: 0.4\n"
                                           "  u_convention: sigma\n  seed: 11\n  noise: fixed\n")
    argv = sys.argv
    try:
        assert launcher.main(["--scorer-config", str(tmp_path / "scorers.yaml"), str(script), "--",
                                 "--reward", "ms-rm-sd3"]) == 0
    finally:
        sys.argv = argv
        _drop_flow_grpo()
    rewards = json.load(open(tmp_path / "rewards.json"))
    np.testing.assert_array_equal(rewards["ms-rm-sd3"], _expected(checkpoints["sigma"], batch, 0.4))


# The zyd-ustc trainer's scorer set-up and reward call (scripts/train_sd3.py at f2f8585) with two
# edits: ms-rm-sd3 in its list of configured names, given the trainer's own pipeline as
# diffusion-rm-sd3 is; and its reward call carries the latents (with_latents).
TRAINER_PY = '''
import argparse, copy, json, sys
import numpy as np
from flow_grpo.scorer import AVAILABLE_SCORERS, MultiScorer
from ms_rm.integrations.flow_grpo import with_latents

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-medium"
USED = []                                      # what of the pipeline the scorers touched


class Vae:
    config = None

    def __getattr__(self, name):
        USED.append("vae." + name)
        raise AssertionError("the VAE was used: the latents were not scored as latents")


class Pipeline:                                # the parts of StableDiffusion3PipelineWithSDELogProb at hand
    scheduler = "sde"

    def __init__(self):
        self.vae = Vae()

    def encode_prompt(self, *args, **kwargs):
        USED.append("encode_prompt")
        raise AssertionError("the text encoders were used: the prompt embeddings were not scored")


parser = argparse.ArgumentParser()
parser.add_argument("--reward", nargs="+", required=True, choices=AVAILABLE_SCORERS.keys())
parser.add_argument("--model", default=DEFAULT_MODEL)
parser.add_argument("--diffusion-rm-checkpoint-path")
parser.add_argument("--diffusion-rm-config-path")
parser.add_argument("--diffusion-rm-u", type=float, default=0.9)
parser.add_argument("--diffusion-rm-pipeline-path")
parser.add_argument("--data")
args = parser.parse_args()
pipeline, original_scheduler = Pipeline(), "original"
scorer_configs = {}
for reward_name in args.reward:
    if reward_name in ["diffusion-rm-flux", "diffusion-rm-sd3", "ms-rm-sd3"]:
        cfg = {"checkpoint_path": args.diffusion_rm_checkpoint_path, "config_path": args.diffusion_rm_config_path,
               "u": args.diffusion_rm_u}
        if reward_name in ["diffusion-rm-sd3", "ms-rm-sd3"]:
            rm_pipeline = copy.copy(pipeline)
            rm_pipeline.scheduler = original_scheduler
            cfg["pipeline"] = rm_pipeline
        else:
            cfg["pipeline_path"] = args.diffusion_rm_pipeline_path or args.model
        scorer_configs[reward_name] = cfg
reward_fn = MultiScorer(dict.fromkeys(args.reward, 1.0), scorer_configs)
d = args.data
latents, ehs, pooled = (np.load(f"{d}/{name}.npy") for name in ("latents", "ehs", "pooled"))
images = [np.zeros((64, 64, 3), np.uint8) for _ in latents]   # output.images: what pixel scorers read
rewards = reward_fn(with_latents(images, latents, ehs, pooled), ["a cat", "a dog"])
json.dump({"rewards": rewards, "used": USED}, open(f"{d}/rewards.json", "w"))
'''


def test_python_m_launcher_scores_the_trainers_latents(fork_roots, checkpoints, batch, tmp_path):
    """`python -m ms_rm.integrations.flow_grpo ... -- train.py`, run as a user runs it (a new process,
    from the fork's checkout): the trainer's with_latents batch is scored as latents, with neither the
    pipeline's VAE nor its text encoders, to the numbers of scoring the latents directly."""
    for name in ("latents", "ehs", "pooled"):
        np.save(tmp_path / f"{name}.npy", batch[name])
    (tmp_path / "train.py").write_text(TRAINER_PY)
    (tmp_path / "scorers.yaml").write_text("ms-rm-sd3:\n  seed: 11\n  noise: fixed\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-m", "ms_rm.integrations.flow_grpo", "--scorer-config", str(tmp_path / "scorers.yaml"),
         "--", str(tmp_path / "train.py"), "--reward", "ms-rm-sd3", "--diffusion-rm-checkpoint-path",
         checkpoints["index"], "--diffusion-rm-config-path", checkpoints["config"], "--data", str(tmp_path)],
        cwd=fork_roots["zyd"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.load(open(tmp_path / "rewards.json"))
    assert out["used"] == []
    np.testing.assert_array_equal(out["rewards"]["ms-rm-sd3"], _expected(checkpoints["index"], batch, 0.9))


class _Pipeline:
    """The parts of a mindone SD3 pipeline the scorer uses for prompts: encode_prompt (and a vae)."""

    def __init__(self, batch):
        self.batch, self.prompts, self.vae = batch, None, object()

    def encode_prompt(self, prompt, prompt_2, prompt_3, do_classifier_free_guidance, max_sequence_length):
        self.prompts = list(prompt)
        return self.batch["ehs"], None, self.batch["pooled"], None

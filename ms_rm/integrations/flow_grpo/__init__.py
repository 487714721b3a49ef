"""ms_rm's scorers inside Flow-GRPO-MS, either public fork, without editing its code.

Flow-GRPO-MS builds its rewards from a registry, `flow_grpo.scorer.multi.AVAILABLE_SCORERS`
(name -> (module under `flow_grpo.scorer`, class name)), and its `MultiScorer` imports
`"flow_grpo.scorer." + module` and instantiates the class:
* zyd-ustc fork: `MultiScorer(scorers, scorer_configs)`: a ready scorer is used only when it is an
  instance of `flow_grpo.scorer.scorer.Scorer`; otherwise `cls(**config)` or `cls()`. Its trainer
  (scripts/train_sd3.py) passes `checkpoint_path`, `config_path` and `u` to the names in its own list
  (`diffusion-rm-flux`, `diffusion-rm-sd3`, Flow-GRPO-MS's own scorers) and nothing to other names;
  with them its own pipeline object (`pipeline`) to `diffusion-rm-sd3`, and to the others
  `pipeline_path`: `--diffusion-rm-pipeline-path`, else `--model` (by default a hub id);
* zhtmike fork: `MultiScorer(scorers)`, always `cls()`.

`register()` adds ms_rm's scorers to that registry as subclasses of Flow-GRPO-MS's `Scorer`, under
names that do not collide with Flow-GRPO-MS's: `ms-rm-sd3`, `ms-rm-flux`, `ms-rm-zimage` (the
Diffusion-RM scorers) and `ms-rm-<name>` for ms_rm's other registered scorers. Keyword arguments
given to `register(configs=...)` become each class's defaults, so the `cls()` of either fork builds
a configured scorer; arguments a trainer passes override them. The launcher

    python -m ms_rm.integrations.flow_grpo --scorer-config ms_rm_scorers.yaml -- scripts/train_sd3.py ARGS

(`launcher.py`, run by this package's `__main__.py`, so a trainer's `from ms_rm.integrations.flow_grpo
import with_latents` and the registered classes share one module) registers and then runs the trainer
script unchanged, so `--reward ms-rm-sd3` is one of its choices.

A Diffusion-RM scorer here takes the trainer's arguments as they are:
* `checkpoint_path`: a folder written by `ms-rm convert` (a reference checkpoint is refused with
  the command that converts it);
* `config_path`: the reference's Diffusion-RM config (JSON or YAML), checked against the converted
  config: layers, taps, head, use_logistic and add_noise must agree;
* `u` under `u_convention` ("index" by default: Flow-GRPO-MS's own meaning of its `u`, u = 0.9 ->
  sigma 0.25); a checkpoint converted under the other convention is refused, not reinterpreted
  (without `u`, the checkpoint's recommended u for the kind of input);
* `pipeline`: the trainer's mindone `StableDiffusion3Pipeline`, whose VAE and text encoders encode
  the images and prompts (`pipeline_path`: a local diffusers SD3 folder encoded by ms_rm's own
  encoders; a hub id, the zyd-ustc trainer's default `--model`, is refused with the trainer edit that
  passes its pipeline instead);
* prompts None -> "" for every image, as Flow-GRPO-MS's scorers do; scores are raw / 5 unless
  `normalize` says otherwise (Flow-GRPO-MS's Diffusion-RM scale).
A call given `with_latents(images, latents, prompt_embeds, pooled_prompt_embeds)` scores the
latents directly (no VAE encode, no text encoders); other scorers of the same MultiScorer see the
images as a plain list. A (B, C, H, W) latent batch passed as `images` (a pipeline run with
`output_type="latent"`) is scored as latents with prompts encoded by the pipeline.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import types
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ...core.errors import ConfigError, InputError
from ...io.files import read_config_file
from ...rewards.diffusion_rm import DiffusionRM
from ...scoring.scorers import SCORERS, DiffusionRMScorer

logger = logging.getLogger(__name__)

MODULE = "ms_rm"                           # the registry's module: flow_grpo.scorer.ms_rm
PREFIX = "ms-rm-"
DIFFUSION_RM_PREFIX = "diffusion-rm-"
FLOW_GRPO_NORMALIZE = "flow-grpo-ms"       # raw / 5, what Flow-GRPO-MS's Diffusion-RM scorer returns
FLOW_GRPO_U_CONVENTION = "index"           # what Flow-GRPO-MS's `u` means
FLOW_GRPO_INDEX_U = 0.9                    # its default u (--diffusion-rm-u)


def flow_grpo_name(name: str) -> str:
    """The Flow-GRPO-MS registry name of an ms_rm scorer: diffusion-rm-sd3 -> ms-rm-sd3."""
    return PREFIX + (name[len(DIFFUSION_RM_PREFIX):] if name.startswith(DIFFUSION_RM_PREFIX) else name)


class LatentBatch(list):
    """The images of a batch (a plain list, what pixel scorers read) carrying the sampler's final
    latents (B, C, H, W) and prompt embeddings, which ms_rm's latent scorers read instead."""

    def __init__(self, images: Sequence[Any], latents, prompt_embeds, pooled_prompt_embeds=None):
        super().__init__(images)
        self.latents, self.prompt_embeds, self.pooled_prompt_embeds = latents, prompt_embeds, pooled_prompt_embeds


def with_latents(images, latents, prompt_embeds, pooled_prompt_embeds=None) -> LatentBatch:
    """What a trainer passes as `images` to score latents: `images` (PIL list, or None when the
    pipeline ran with output_type="latent" and every scorer reads latents) plus the final latents
    (B, C, H, W) and prompt embeddings (B, T, D) / pooled (B, P)."""
    batch = int(latents.shape[0])
    if images is None:
        images = [None] * batch                    # a pixel scorer given these fails loudly
    elif not isinstance(images, (list, tuple)):
        raise InputError(f"with_latents: images must be a list (the pipeline's PIL output) or None, got "
                         f"{type(images).__name__}")
    if len(images) != batch:
        raise InputError(f"with_latents: {len(images)} images for {batch} latents")
    return LatentBatch(images, latents, prompt_embeds, pooled_prompt_embeds)


# --- the adapters ----------------------------------------------------------------------------------

def _prompts(prompts: Optional[Sequence[str]], batch: int) -> List[str]:
    """Flow-GRPO-MS's scorers score against "" when the trainer passes no prompts."""
    if prompts is None:
        return [""] * batch
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != batch:
        raise InputError(f"got {batch} images and {len(prompts)} prompts: pass one prompt per image")
    return prompts


def _is_latent_batch(images, channels: int) -> bool:
    """A (B, C, H, W) batch of latents (a pipeline's output_type="latent"), not images."""
    shape = getattr(images, "shape", None)
    return shape is not None and len(shape) == 4 and shape[1] == channels and shape[-1] != 3


def check_reference_config(model_config, config_path: str) -> None:
    """ConfigError unless the reference config at `config_path` describes the converted model."""
    rm_config = read_config_file(config_path)
    differences = model_config.reference_differences(rm_config, os.fspath(config_path))
    if differences:
        raise ConfigError(f"{config_path} does not describe the converted checkpoint: " + "; ".join(differences)
                          + ": pass the config the checkpoint was converted from")


class DiffusionRMAdapter:
    """A Diffusion-RM scorer configured the way Flow-GRPO-MS's trainer configures its own."""

    scorer_class = DiffusionRMScorer
    defaults: Dict[str, Any] = {}

    def __init__(self, checkpoint_path: Optional[str] = None, config_path: Optional[str] = None, pipeline: Any = None,
                 pipeline_path: Optional[str] = None, u: Optional[float] = None, u_convention: Optional[str] = None,
                 **options):
        given = dict(checkpoint_path=checkpoint_path, config_path=config_path, pipeline=pipeline,
                     pipeline_path=pipeline_path, **options)
        settings = {**self.defaults, **{k: v for k, v in given.items() if v is not None}}
        # u and its convention travel together: a trainer's u (no convention with it) is Flow-GRPO-MS's
        source = {"u": u, "u_convention": u_convention} if u is not None else self.defaults
        settings.pop("u_convention", None)
        u, u_convention = source.get("u"), source.get("u_convention") or FLOW_GRPO_U_CONVENTION
        name = flow_grpo_name(self.scorer_class.name)
        checkpoint_path = settings.pop("checkpoint_path", None)
        if checkpoint_path is None:
            raise ConfigError(f"{name}: no checkpoint_path: register it (ms_rm.integrations.flow_grpo.register("
                              f"configs={{'{name}': {{'checkpoint_path': ...}}}}) or --scorer-config) or pass it "
                              "in the trainer's scorer_configs")
        if not os.path.isfile(os.path.join(os.fspath(checkpoint_path), "manifest.json")):
            raise ConfigError(f"{checkpoint_path}: not a folder written by ms-rm convert (no manifest.json); convert "
                              "the reference checkpoint first: ms-rm convert SRC --transformer ... --scheduler ... "
                              "--out FOLDER [--u-convention index]")
        config_path = settings.pop("config_path", None)
        pipeline, pipeline_path = settings.pop("pipeline", None), settings.pop("pipeline_path", None)
        settings.setdefault("normalize", FLOW_GRPO_NORMALIZE)
        settings["u"] = u
        model = DiffusionRM.from_pretrained(checkpoint_path, **{k: settings.pop(k) for k in ("dtype", "mode", "verify")
                                                                if k in settings})
        model_config = model.config
        if u is not None and u_convention != model_config.u_convention:
            raise ConfigError(
                f"{name}: u {u} is given under the '{u_convention}' convention (a trainer's u is Flow-GRPO-MS's, "
                f"'index': 0.9 -> sigma 0.25) but {checkpoint_path} was converted under '{model_config.u_convention}': "
                f"give u with u_convention='{model_config.u_convention}' in the scorer's config (and not from the "
                f"trainer), or re-convert with --u-convention {u_convention} if the checkpoint was trained so")
        if u is None and model_config.u_convention == FLOW_GRPO_U_CONVENTION:
            settings["u"] = FLOW_GRPO_INDEX_U            # Flow-GRPO-MS's default for images and latents alike
        if config_path is not None:
            check_reference_config(model_config, config_path)
        if (pipeline is not None or pipeline_path is not None) and "encoder" not in settings:
            if model_config.backbone.family != "sd3":
                raise ConfigError(f"{name}: ms_rm encodes images for SD3 models only; this {model_config.backbone.family} "
                                  "model scores latents: pass with_latents(images, latents, prompt_embeds, pooled) "
                                  "and no pipeline / pipeline_path")
            if pipeline is not None:
                from ...encoders.sd3_encoder import MindOneSD3Encoder
                settings["encoder"] = MindOneSD3Encoder(pipeline)
            else:
                if not os.path.isdir(pipeline_path):
                    raise ConfigError(
                        f"{name}: pipeline_path {pipeline_path!r} is not a local folder (ms_rm never downloads; "
                        "the zyd-ustc trainer passes its --model here, a hub id by default, to every name it "
                        "configures but diffusion-rm-sd3): give this scorer the trainer's own pipeline as that "
                        "trainer gives diffusion-rm-sd3 (scripts/train_sd3.py: `if reward_name in "
                        "[\"diffusion-rm-sd3\", \"ms-rm-sd3\"]:` before `cfg[\"pipeline\"] = rm_pipeline`), or "
                        "pass a local SD3 pipeline folder (--diffusion-rm-pipeline-path)")
                from ...encoders.sd3_encoder import SD3Encoder
                settings["encoder"] = SD3Encoder.from_pretrained(pipeline_path)
        self.scorer = self.scorer_class(model=model, **settings)
        self.channels = model_config.backbone.latent_channels

    def __call__(self, images, prompts: Optional[Sequence[str]] = None) -> List[float]:
        if isinstance(images, LatentBatch):
            return self.scorer.score_latents(images.latents, images.prompt_embeds, images.pooled_prompt_embeds)
        if _is_latent_batch(images, self.channels):
            encoder = self.scorer.encoder
            if encoder is None:
                raise ConfigError("latents without prompt embeddings need the trainer's pipeline (pipeline=) to "
                                  "encode the prompts; or pass with_latents(images, latents, prompt_embeds, pooled)")
            embeds, pooled = encoder.encode_prompts(_prompts(prompts, int(images.shape[0])))
            return self.scorer.score_latents(images, embeds, pooled)
        batch = len(images) if isinstance(images, (list, tuple)) else int(images.shape[0])
        return self.scorer(images, _prompts(prompts, batch))

    def __getattr__(self, attribute):
        """Everything else (reward, score_latents, model, ...) is the ms_rm scorer's."""
        if attribute == "scorer":
            raise AttributeError(attribute)
        return getattr(self.scorer, attribute)


class ScorerAdapter:
    """Any other ms_rm scorer: its own arguments; "" for prompts None."""

    scorer_class: type = None
    defaults: Dict[str, Any] = {}

    def __init__(self, **options):
        self.scorer = self.scorer_class(**{**self.defaults, **options})

    def __call__(self, images, prompts: Optional[Sequence[str]] = None) -> List[float]:
        source = images if not isinstance(images, LatentBatch) else list(images)
        batch = len(source) if isinstance(source, (list, tuple)) else int(source.shape[0])
        return self.scorer(source, _prompts(prompts, batch))

    def __getattr__(self, attribute):
        if attribute == "scorer":
            raise AttributeError(attribute)
        return getattr(self.scorer, attribute)


# --- registration ----------------------------------------------------------------------------------

def _flow_grpo():
    """Flow-GRPO-MS's Scorer base class and scorer registry."""
    try:
        scorer_module = importlib.import_module("flow_grpo.scorer.scorer")
        multi_module = importlib.import_module("flow_grpo.scorer.multi")
    except ImportError as e:
        raise ConfigError(f"Flow-GRPO-MS is not importable ({e}): put its checkout on PYTHONPATH (either fork: "
                          "zyd-ustc/Flow-GRPO-MS or zhtmike/Flow-GRPO-MS)") from None
    for module, attribute in ((scorer_module, "Scorer"), (multi_module, "AVAILABLE_SCORERS")):
        if not hasattr(module, attribute):
            raise ConfigError(f"{module.__name__} has no {attribute}: not a Flow-GRPO-MS this integration knows")
    return scorer_module.Scorer, multi_module.AVAILABLE_SCORERS


def register(configs: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Dict[str, type]:
    """Add ms_rm's scorers to Flow-GRPO-MS's registry; returns {name: class}.

    configs: {flow-grpo name: default keyword arguments}, e.g. {"ms-rm-sd3": {"checkpoint_path":
    "/models/dina-lrm-ms", "u": 0.4, "u_convention": "sigma"}}. Calling it again replaces the defaults."""
    base, available = _flow_grpo()
    configs = dict(configs or {})
    names = {flow_grpo_name(name): name for name in SCORERS}
    unknown = sorted(set(configs) - set(names))
    if unknown:
        raise ConfigError(f"configs names no ms_rm scorer: {unknown}; registered are {sorted(names)}")
    taken = {n: available[n] for n in names if n in available and available[n][0] != MODULE}
    if taken:
        raise ConfigError(f"Flow-GRPO-MS already registers {taken}; not replacing them")
    module = types.ModuleType(f"flow_grpo.scorer.{MODULE}", "ms_rm's scorers, registered by ms_rm.integrations.flow_grpo")
    classes: Dict[str, type] = {}
    for flow_name, name in names.items():
        scorer_class = SCORERS[name]
        adapter = DiffusionRMAdapter if issubclass(scorer_class, DiffusionRMScorer) else ScorerAdapter
        class_name = "MsRm" + "".join(part.capitalize() for part in flow_name[len(PREFIX):].split("-")) + "Scorer"
        defaults = configs.get(flow_name, {})
        if not isinstance(defaults, Mapping):
            raise ConfigError(f"configs['{flow_name}'] must be a mapping of keyword arguments, got {defaults!r}")
        classes[flow_name] = type(base)(class_name, (adapter, base), {"scorer_class": scorer_class,
                                                                      "defaults": dict(defaults),
                                                                      "__module__": module.__name__})
        setattr(module, class_name, classes[flow_name])
    sys.modules[module.__name__] = module                 # then the registry: nothing changes on an error above
    setattr(sys.modules["flow_grpo.scorer"], MODULE, module)
    available.update({flow_name: (MODULE, cls.__name__) for flow_name, cls in classes.items()})
    logger.info("registered with Flow-GRPO-MS: %s", ", ".join(classes))
    return classes


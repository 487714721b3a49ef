"""Config parsing: the reference's files, our own format, and the errors that name the key."""

import json
from pathlib import Path

import pytest

from ms_rm.backbones.config import SD3BackboneConfig
from ms_rm.core.errors import ConfigError
from ms_rm.io.files import read_config_file
from ms_rm.rewards.diffusion_rm.config import RewardModelConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _release():
    return (read_config_file(CONFIGS / "sd35m" / "dina-lrm-12layers.json"),
            read_config_file(CONFIGS / "sd35m" / "transformer_config.json"),
            read_config_file(CONFIGS / "sd35m" / "scheduler_config.json"))


def test_release_config_parses():
    config = RewardModelConfig.from_reference(*_release())
    assert config.backbone.inner_dim == 1536 and config.backbone.qk_norm == "rms_norm"
    assert config.num_transformer_layers == 12 and config.last_depth == 12
    assert config.visual_head_idx == (4, 8, 12) and config.text_head_idx == (4, 8, 12)
    assert config.width == 1536 and config.head.num_attn_heads == 8
    assert config.scheduler.shift == 3.0 and config.add_noise and config.u_convention == "sigma"


def test_our_format_round_trips(tmp_path):
    config = RewardModelConfig.from_reference(*_release(), u_convention="index")
    path = tmp_path / "ms_rm_config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert load_config(path) == config


def test_yaml_reference_config(tmp_path):
    rm, tr, sc = _release()
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(rm))
    assert RewardModelConfig.from_reference(read_config_file(path), tr, sc).num_transformer_layers == 12


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("num_transformer_layers"), "missing required key 'num_transformer_layers'"),
    (lambda m: m.update(num_transformer_layers="12"), "'num_transformer_layers' must be int"),
    (lambda m: m.update(num_transformer_layers=24), r"must be in 1\.\.23"),
    (lambda m: m.update(visual_head_idx=[8, 4, 12]), "strictly increasing"),
    (lambda m: m.update(text_head_idx=[4, 8, 13]), r"must lie in 0\.\.12"),
    (lambda m: m.update(text_head_idx=[]), "at least one tap"),
    (lambda m: m["reward_head"].update(num_attn_heads=7), "not divisible by num_attn_heads 7"),
    (lambda m: m.update(use_logistic="yes"), "'use_logistic' must be bool"),
])
def test_bad_reference_config_names_the_key(change, message):
    rm, tr, sc = _release()
    change(rm["model"])
    with pytest.raises(ConfigError, match=message) as info:
        RewardModelConfig.from_reference(rm, tr, sc)
    assert "config.json" in str(info.value)


def test_bad_transformer_config_names_the_file():
    rm, tr, sc = _release()
    with pytest.raises(ConfigError, match="transformer config.json: caption_projection_dim"):
        RewardModelConfig.from_reference(rm, dict(tr, caption_projection_dim=1024), sc)
    with pytest.raises(ConfigError, match="'UNet2DConditionModel' is not a supported backbone"):
        RewardModelConfig.from_reference(rm, dict(tr, _class_name="UNet2DConditionModel"), sc)
    with pytest.raises(ConfigError, match="expected 'SD3Transformer2DModel'"):
        SD3BackboneConfig.from_diffusers(dict(tr, _class_name="FluxTransformer2DModel"))
    with pytest.raises(ConfigError, match="qk_norm 'layer_norm' is not supported"):
        SD3BackboneConfig.from_diffusers(dict(tr, qk_norm="layer_norm"))


def test_our_format_refuses_unknown_keys_and_versions():
    config = RewardModelConfig.from_reference(*_release()).to_dict()
    with pytest.raises(ConfigError, match=r"unknown keys \['extra'\]"):
        RewardModelConfig.from_dict(dict(config, extra=1))
    with pytest.raises(ConfigError, match="format_version 2 is not supported"):
        RewardModelConfig.from_dict(dict(config, format_version=2))
    with pytest.raises(ConfigError, match="is this a reference config"):
        RewardModelConfig.from_dict({"model": {}})


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_config_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: invalid JSON"):
        read_config_file(bad)


@pytest.mark.parametrize("change, message", [
    ({"num_train_timesteps": 2 ** 63}, r"num_train_timesteps must be in 1\.\.100000"),
    ({"shift": float("nan")}, r"shift must be a finite number in \(0, 1e4\]"),
    ({"shift": -1.0}, r"shift must be a finite number"),
    ({"_class_name": "DDPMScheduler"}, "needs FlowMatchEulerDiscreteScheduler"),
])
def test_bad_scheduler_config(change, message):
    from ms_rm.rewards.diffusion_rm.config import SchedulerConfig

    with pytest.raises(ConfigError, match=message):
        SchedulerConfig.from_diffusers(dict({"num_train_timesteps": 1000, "shift": 3.0}, **change))


def _flux_release():
    flux = CONFIGS / "flux1-dev"
    return (read_config_file(flux / "diffusion-rm-19layers.json"), read_config_file(flux / "transformer_config.json"),
            read_config_file(flux / "scheduler_config.json"))


def test_flux_time_convention_and_guidance_follow_the_reference_by_default():
    """The upstream FLUX config has no guidance key (its model embeds 3.5) and its model feeds
    time_text_embed sigma and the guidance unscaled: both are the defaults, recorded in our
    format; diffusers' convention only when asked for; a config written before the key existed
    meant diffusers' convention; SD3 has one convention only."""
    config = RewardModelConfig.from_reference(*_flux_release())
    assert (config.guidance_scale, config.time_convention) == (3.5, "reference")
    assert RewardModelConfig.from_dict(config.to_dict()) == config
    diffusers = RewardModelConfig.from_reference(*_flux_release(), time_convention="diffusers")
    assert diffusers.to_dict()["time_convention"] == "diffusers"
    legacy = {k: v for k, v in config.to_dict().items() if k != "time_convention"}
    assert RewardModelConfig.from_dict(legacy).time_convention == "diffusers"
    explicit = _flux_release()
    explicit[0]["model"]["guidance_scale"] = 4.0
    assert RewardModelConfig.from_reference(*explicit).guidance_scale == 4.0
    with pytest.raises(ConfigError, match="time_convention 'diffusers' applies to FLUX backbones only"):
        RewardModelConfig.from_reference(*_release(), time_convention="diffusers")
    with pytest.raises(ConfigError, match=r"time_convention 'x1000' must be one of \('reference', 'diffusers'\)"):
        RewardModelConfig.from_reference(*_flux_release(), time_convention="x1000")


def test_a_class_name_that_is_not_a_string_is_a_config_error():
    """Found by the conversion fuzz test: a list as _class_name raised TypeError (unhashable)."""
    from ms_rm import ConfigError
    from ms_rm.backbones.config import backbone_from_diffusers

    with pytest.raises(ConfigError, match="_class_name"):
        backbone_from_diffusers({"_class_name": []}, "transformer/config.json")


def test_the_shared_integer_and_number_checks_refuse_bools_and_non_finite_values():
    import numpy as np

    from ms_rm.core.config import is_int, is_number

    assert is_int(3) and is_int(np.int64(3)) and is_int(0) and not is_int(0, 1)
    assert is_int(5, 1, 5) and not is_int(6, 1, 5) and is_int(5, 1, None)
    for value in (True, np.bool_(True), 3.0, "3", None):
        assert not is_int(value), value
    assert is_number(2) and is_number(2.5) and is_number(np.float32(2.5)) and is_number(np.int32(2))
    for value in (True, False, float("nan"), float("inf"), "1", None):
        assert not is_number(value), value
    assert is_number(float("inf"), finite=False) and not is_number(True, finite=False)

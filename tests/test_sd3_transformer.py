"""One SD3 transformer class serves the generator (whole) and the reward model (cut after N blocks):
the cut holds a subset of the whole network's parameters under the same names, and with the same
weights its taps are the whole network's streams at those depths, bit for bit."""

import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor

from ms_rm import ConfigError
from ms_rm.backbones import BACKBONES, SD3Backbone
from ms_rm.backbones.config import SD3BackboneConfig
from ms_rm.backbones.sd3_transformer import SD3Transformer

CONFIG = SD3BackboneConfig(num_layers=3, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                           joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
                           pos_embed_max_size=8, sample_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")


def _filled(model, values):
    for p in model.get_parameters():
        p.set_data(Tensor(values[p.name]))
    return model


def test_the_reward_backbone_is_the_transformer_cut_after_its_deepest_tap():
    ms.runtime.launch_blocking()
    assert SD3Backbone is SD3Transformer and BACKBONES["sd3"] is SD3Transformer
    whole = SD3Transformer(CONFIG)
    cut = SD3Transformer(CONFIG, (0, 2), (1,))
    names = {p.name: tuple(p.shape) for p in whole.get_parameters()}
    cut_names = {p.name: tuple(p.shape) for p in cut.get_parameters()}
    assert cut_names.items() <= names.items()
    assert not any(n.startswith(("norm_out.", "proj_out.", "transformer_blocks.2.")) for n in cut_names)
    # block 2 (index 1) is the cut's deepest: its text stream is not read, so it holds no to_add_out / ff_context
    assert "transformer_blocks.1.ff_context.net.2.weight" not in cut_names
    assert "transformer_blocks.1.attn2.to_q.weight" not in cut_names          # dual attention at block 0 only
    # the whole network's last block is context_pre_only (diffusers): no text output weights
    assert "transformer_blocks.2.norm1_context.linear.weight" in names
    assert "transformer_blocks.2.ff_context.net.2.weight" not in names

    rng = np.random.default_rng(0)
    values = {n: rng.standard_normal(s).astype(np.float32) * 0.3 for n, s in names.items()}
    _filled(whole, values)
    _filled(cut, values)
    latents = Tensor(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    timestep = Tensor(np.array([250.0, 700.0], np.float32))
    text = Tensor(rng.standard_normal((2, 5, 12)).astype(np.float32))
    pooled = Tensor(rng.standard_normal((2, 10)).astype(np.float32))
    (positions,) = cut.host_inputs(8, 8, 5, 2)
    assert np.array_equal(positions, whole.positions(8, 8))
    positions = Tensor(positions)

    temb, image, streams_text = whole.streams(latents, timestep, text, pooled, positions)
    assert len(image) == 3 and len(streams_text) == 2                       # the last block: no text output
    cut_temb, visual, text_taps = cut(latents, timestep, text, pooled, positions)
    assert np.array_equal(cut_temb.asnumpy(), temb.asnumpy())
    assert np.array_equal(visual[1].asnumpy(), image[1].asnumpy())          # depth 2 = after block 2
    assert np.array_equal(text_taps[0].asnumpy(), streams_text[0].asnumpy())
    velocity = whole(latents, timestep, text, pooled, positions)
    assert velocity.shape == (2, 4, 8, 8)
    assert np.array_equal(velocity.asnumpy(), whole.output(image[-1], temb, 8, 8).asnumpy())


def test_a_cut_needs_both_tap_lists():
    with pytest.raises(ConfigError, match="both visual_taps and text_taps"):
        SD3Transformer(CONFIG, (1,), None)

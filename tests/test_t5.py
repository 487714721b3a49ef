"""ms_rm's T5 encoder (ms_rm.encoders.t5) against transformers' T5EncoderModel: the position
buckets, the hidden states from fp32, fp16 and bf16 files, weights kept in the file's dtype, and
strict loading."""

import json
import os

import numpy as np
import pytest

from helpers import import_extra

import_extra("transformers", "transformers", "reference")

import torch  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

import mindspore as ms  # noqa: E402
from ms_rm.core.errors import CheckpointError, ConfigError  # noqa: E402
from ms_rm.encoders.t5 import T5Encoder, relative_position_buckets  # noqa: E402
from ms_rm_parity.compare import FP32_BOUND, max_rel_error  # noqa: E402
from ms_rm_parity.text_reference import build_t5_encoder, build_t5_tokenizer  # noqa: E402


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 16)])
def test_position_buckets_match_transformers(num_buckets, max_distance):
    length = 600                                  # every distance up to 599, past the 512 tokens T5 takes
    position = torch.arange(length)
    reference = T5Attention._relative_position_bucket(position[None, :] - position[:, None], bidirectional=True,
                                                      num_buckets=num_buckets, max_distance=max_distance)
    np.testing.assert_array_equal(relative_position_buckets(length, num_buckets, max_distance), reference.numpy())


@pytest.fixture(scope="module")
def t5_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    tokenizer = build_t5_tokenizer(str(root / "tokenizer"))
    model = build_t5_encoder(tokenizer, 96, seed=4)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (3, 20))
    return root, model, ids


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_hidden_states_match_transformers(t5_model, dtype):
    """Saved in `dtype`, loaded by both: transformers in float32 (the widened file values), ms_rm
    keeping the weights in `dtype` and computing in float32."""
    root, model, ids = t5_model
    folder = str(root / dtype)
    stored = model.to(getattr(torch, dtype))
    stored.save_pretrained(folder, safe_serialization=True)
    reference_model = stored.float().eval()
    with torch.no_grad():
        reference = reference_model(torch.from_numpy(ids)).last_hidden_state.numpy()
    model.float()
    encoder = T5Encoder.from_pretrained(folder)
    assert encoder.blocks[0][1].dtype == getattr(ms, dtype) and encoder.embedding.dtype.name == dtype
    ours = encoder(ids).asnumpy()
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    assert max_rel_error(ours, reference) <= FP32_BOUND
    assert np.abs(ours[0] - ours[1]).max() > 0.1 * np.abs(ours).max()        # rows differ: a real check


def _rewrite(folder, edit):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_strict_loading(t5_model, tmp_path):
    root, model, _ = t5_model
    model.float().save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    import shutil

    cases = {
        "missing": (lambda t: t.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight"), "missing keys"),
        "extra": (lambda t: t.update(stray=np.zeros(2, np.float32)), "unexpected keys"),
        "shape": (lambda t: t.update({"encoder.final_layer_norm.weight": np.ones(5, np.float32)}), "has shape"),
        "nan": (lambda t: t["encoder.block.0.layer.0.SelfAttention.q.weight"].__setitem__((0, 0), np.nan), "NaN"),
        "int": (lambda t: t.update({"encoder.final_layer_norm.weight": np.ones(96, np.int32)}), "expected float32"),
    }
    for name, (edit, message) in cases.items():
        folder = str(tmp_path / name)
        shutil.copytree(str(tmp_path / "base"), folder)
        _rewrite(folder, edit)
        with pytest.raises(CheckpointError, match=message):
            T5Encoder.from_pretrained(folder)
    config_path = tmp_path / "base" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, feed_forward_proj="relu")))
    with pytest.raises(ConfigError, match="feed_forward_proj is 'relu'.*gated-gelu"):
        T5Encoder.from_pretrained(str(tmp_path / "base"))

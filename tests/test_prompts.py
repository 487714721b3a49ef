"""SD3 prompt encoding (ms_rm.encoders.sd3_prompts) against diffusers' StableDiffusion3Pipeline.encode_prompt.

Tiny random CLIP-L / CLIP-G / T5 encoders and locally built tokenizers are saved in a diffusers
SD3 pipeline layout (parity/text_reference.py); diffusers encodes the prompts with the torch
models, ms_rm with mindone's models loaded from the same folder.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import import_extra

import_extra("mindone.transformers", "mindone", "images")      # installed but broken: fails, never skips
import_extra("diffusers", "diffusers", "reference")

from ms_rm.core.errors import CheckpointError, ConfigError, InputError, MissingDependencyError  # noqa: E402
from ms_rm.encoders.sd3_prompts import SD3PromptEncoder  # noqa: E402
from ms_rm_parity.compare import FP32_BOUND, max_rel_error as max_relative_error  # noqa: E402
from ms_rm_parity.text_reference import reference_encode_prompt, write_sd3_text_folder  # noqa: E402

MAX_SEQUENCE_LENGTH = 16
T5_WIDTH = 96                     # CLIP-L 32 + CLIP-G 48 = 80 channels, zero-padded to 96
NO_T5_WIDTH = 112                 # joint_attention_dim when there is no T5
TOLERANCE = FP32_BOUND            # max |ms - torch| / max |torch|, fp32: the tolerance policy's floor
PROMPTS = [
    "a photo of a cat",
    "Two CATS on a red table! " * 12,           # longer than 77 CLIP and 16 T5 tokens: truncated
    "x",
    "a dog in the sky, ünïcode ☃",             # bytes for CLIP, unknown pieces for T5
]


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A tiny SD3 text-encoder folder and diffusers' encodings of PROMPTS, with and without T5."""
    root = str(tmp_path_factory.mktemp("sd3_text"))
    components = write_sd3_text_folder(root, seed=0, t5_width=T5_WIDTH)
    with_t5 = reference_encode_prompt(components, PROMPTS, MAX_SEQUENCE_LENGTH, T5_WIDTH)
    components.text_encoder_3 = None
    without_t5 = reference_encode_prompt(components, PROMPTS, MAX_SEQUENCE_LENGTH, NO_T5_WIDTH)
    return root, with_t5, without_t5


@pytest.fixture(scope="module")
def encoder(pipeline_folder):
    return SD3PromptEncoder.from_pretrained(pipeline_folder[0], max_sequence_length=MAX_SEQUENCE_LENGTH,
                                           joint_attention_dim=T5_WIDTH)


def test_reference_is_not_trivial(pipeline_folder):
    """The comparison below means something: prompts give different embeddings, every part is
    non-zero where it should be, and the CLIP padding is zero."""
    _, (embeds, pooled), _ = pipeline_folder
    assert embeds.shape == (len(PROMPTS), 77 + MAX_SEQUENCE_LENGTH, T5_WIDTH)
    assert pooled.shape == (len(PROMPTS), 32 + 48)
    scale = np.abs(embeds).max()
    assert np.abs(embeds[0] - embeds[2]).max() > 0.1 * scale
    assert np.abs(pooled[0] - pooled[2]).max() > 0.1 * np.abs(pooled).max()
    assert np.abs(embeds[:, :77, :80]).max(axis=(1, 2)).min() > 0.1
    assert np.abs(embeds[:, 77:]).max(axis=(1, 2)).min() > 0.1
    assert np.all(embeds[:, :77, 80:] == 0)


def test_encode_matches_diffusers(encoder, pipeline_folder):
    _, (ref_embeds, ref_pooled), _ = pipeline_folder
    embeds, pooled = encoder.encode(PROMPTS)
    assert embeds.shape == ref_embeds.shape and pooled.shape == ref_pooled.shape
    assert encoder.num_tokens == 77 + MAX_SEQUENCE_LENGTH and encoder.pooled_dim == 80 and encoder.uses_t5
    embeds, pooled = embeds.asnumpy(), pooled.asnumpy()
    for name, actual, reference in (("CLIP part", embeds[:, :77], ref_embeds[:, :77]),
                                    ("T5 part", embeds[:, 77:], ref_embeds[:, 77:]),
                                    ("pooled", pooled, ref_pooled)):
        error = max_relative_error(actual, reference)
        assert error <= TOLERANCE, f"{name}: max relative error {error:.3g}"
    assert np.all(embeds[:, :77, 80:] == 0)


def test_eager_encoder_matches_diffusers_and_the_compiled_one(encoder, pipeline_folder):
    """mode="pynative" (what ms-rm score-images uses, so that the text encoders are freed after the
    prompts) gives diffusers' numbers too."""
    root, (ref_embeds, ref_pooled), _ = pipeline_folder
    eager = SD3PromptEncoder.from_pretrained(root, max_sequence_length=MAX_SEQUENCE_LENGTH,
                                            joint_attention_dim=T5_WIDTH, mode="pynative")
    embeds, pooled = eager.encode(PROMPTS)
    assert max_relative_error(embeds.asnumpy(), ref_embeds) <= TOLERANCE
    assert max_relative_error(pooled.asnumpy(), ref_pooled) <= TOLERANCE
    compiled = encoder.encode(PROMPTS)
    assert max_relative_error(embeds.asnumpy(), compiled[0].asnumpy()) <= TOLERANCE
    with pytest.raises(InputError, match="mode must be one of"):
        SD3PromptEncoder(eager.clip_l, eager.clip_g, eager.t5, eager.tokenizer_l, eager.tokenizer_g,
                         eager.tokenizer_t5, mode="eager")


def test_encoder_built_from_components_matches(encoder, pipeline_folder):
    """The constructor takes already-built mindone models and tokenizers (a pipeline's); one
    prompt given as a str gives the first row of the batch encoding."""
    _, (ref_embeds, ref_pooled), _ = pipeline_folder
    rebuilt = SD3PromptEncoder(encoder.clip_l, encoder.clip_g, encoder.t5, encoder.tokenizer_l,
                               encoder.tokenizer_g, encoder.tokenizer_t5,
                               max_sequence_length=MAX_SEQUENCE_LENGTH, joint_attention_dim=T5_WIDTH)
    embeds, pooled = rebuilt.encode(PROMPTS[0])
    assert embeds.shape == (1, 77 + MAX_SEQUENCE_LENGTH, T5_WIDTH)
    assert max_relative_error(embeds.asnumpy(), ref_embeds[:1]) <= TOLERANCE
    assert max_relative_error(pooled.asnumpy(), ref_pooled[:1]) <= TOLERANCE


def test_without_t5_matches_diffusers(pipeline_folder, tmp_path):
    """use_t5=False, and a folder without text_encoder_3, both give diffusers' text_encoder_3=None
    result: CLIP padded to joint_attention_dim, zeros for the T5 tokens."""
    root, _, (ref_embeds, ref_pooled) = pipeline_folder
    assert ref_embeds.shape == (len(PROMPTS), 77 + MAX_SEQUENCE_LENGTH, NO_T5_WIDTH)
    no_t5_root = str(tmp_path / "no_t5")
    for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(os.path.join(root, part), os.path.join(no_t5_root, part))
    for source, use_t5 in ((root, False), (no_t5_root, True)):
        encoder = SD3PromptEncoder.from_pretrained(source, max_sequence_length=MAX_SEQUENCE_LENGTH,
                                                   joint_attention_dim=NO_T5_WIDTH, use_t5=use_t5)
        assert not encoder.uses_t5
        embeds, pooled = encoder.encode(PROMPTS)
        embeds = embeds.asnumpy()
        assert embeds.shape == ref_embeds.shape
        assert np.all(embeds[:, 77:] == 0) and np.all(embeds[:, :77, 80:] == 0)
        assert max_relative_error(embeds, ref_embeds) <= TOLERANCE
        assert max_relative_error(pooled.asnumpy(), ref_pooled) <= TOLERANCE


@pytest.mark.parametrize("prompts, message", [
    ([], "prompts is empty"),
    (["a cat", 3], r"prompts\[1\] must be a str, got int"),
    (None, "prompts must be a str or a list of str, got NoneType"),
    (np.array(["a cat"]), "prompts must be a str or a list of str, got ndarray"),
])
def test_bad_prompts_are_refused(encoder, prompts, message):
    with pytest.raises(InputError, match=message):
        encoder.encode(prompts)


def test_bad_sizes_are_refused(encoder):
    parts = (encoder.clip_l, encoder.clip_g, encoder.t5,
             encoder.tokenizer_l, encoder.tokenizer_g, encoder.tokenizer_t5)
    with pytest.raises(ConfigError, match="max_sequence_length must be an integer, 1 to 512, got 513"):
        SD3PromptEncoder(*parts, max_sequence_length=513)
    with pytest.raises(ConfigError, match="joint_attention_dim must be an integer, at least 1, got 0"):
        SD3PromptEncoder(*parts, joint_attention_dim=0)
    with pytest.raises(ConfigError, match="t5 and tokenizer_t5 go together"):
        SD3PromptEncoder(*parts[:5], None)
    with pytest.raises(ConfigError, match=r"the CLIP hidden states \(32 \+ 48 channels\) are wider than "
                                          r"the T5 part \(64\)"):
        SD3PromptEncoder(*parts[:2], None, *parts[3:5], None, joint_attention_dim=64)


def test_bf16_is_loaded_as_fp32_on_the_cpu_and_refused_when_given(encoder, pipeline_folder):
    """The CPU has no bf16 MatMul/Softmax: from_pretrained loads bf16 as fp32 there, and the
    constructor refuses a bf16 model instead of failing at the first encode."""
    import mindspore as ms
    from mindone.transformers import CLIPTextModelWithProjection

    root = pipeline_folder[0]
    loaded = SD3PromptEncoder.from_pretrained(root, max_sequence_length=MAX_SEQUENCE_LENGTH,
                                              joint_attention_dim=NO_T5_WIDTH, dtype=ms.bfloat16, use_t5=False)
    assert loaded.clip_l.dtype == ms.float32 and loaded.clip_g.dtype == ms.float32
    clip_l_bf16 = CLIPTextModelWithProjection.from_pretrained(os.path.join(root, "text_encoder"), dtype=ms.bfloat16)
    with pytest.raises(ConfigError, match="clip_l is in BFloat16, which this device cannot compute in"):
        SD3PromptEncoder(clip_l_bf16, encoder.clip_g, None, encoder.tokenizer_l, encoder.tokenizer_g, None,
                         joint_attention_dim=NO_T5_WIDTH)


def test_missing_parts_are_named(pipeline_folder, tmp_path):
    root = pipeline_folder[0]
    with pytest.raises(ConfigError, match="not a folder; expected a diffusers SD3 pipeline folder"):
        SD3PromptEncoder.from_pretrained(str(tmp_path / "nowhere"))
    broken = str(tmp_path / "broken")
    shutil.copytree(root, broken)
    shutil.rmtree(os.path.join(broken, "tokenizer_3"))
    with pytest.raises(ConfigError, match=r"tokenizer_3: missing; .*T5TokenizerFast"):
        SD3PromptEncoder.from_pretrained(broken)
    shutil.rmtree(os.path.join(broken, "tokenizer_2"))
    with pytest.raises(ConfigError, match=r"tokenizer_2: missing; an SD3 pipeline folder needs tokenizer_2/ "
                                          r"holding the CLIP-G tokenizer"):
        SD3PromptEncoder.from_pretrained(broken, use_t5=False)
    shutil.copytree(os.path.join(root, "tokenizer_2"), os.path.join(broken, "tokenizer_2"))
    os.remove(os.path.join(broken, "text_encoder", "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"text_encoder: no model.safetensors .*CLIP-L text encoder"):
        SD3PromptEncoder.from_pretrained(broken, use_t5=False)
    os.remove(os.path.join(broken, "text_encoder", "config.json"))
    with pytest.raises(ConfigError, match=r"text_encoder: no config.json"):
        SD3PromptEncoder.from_pretrained(broken, use_t5=False)


def test_checkpoint_without_a_models_tensor_is_refused(pipeline_folder, tmp_path):
    """A CLIPTextModel (no text_projection) where CLIPTextModelWithProjection belongs: mindone
    would leave the projection random with a warning; ms_rm refuses."""
    from transformers import CLIPTextConfig, CLIPTextModel

    broken = str(tmp_path / "no_projection")
    shutil.copytree(pipeline_folder[0], broken)
    shutil.rmtree(os.path.join(broken, "text_encoder"))
    config = CLIPTextConfig.from_pretrained(os.path.join(pipeline_folder[0], "text_encoder"))
    config.architectures = ["CLIPTextModel"]
    CLIPTextModel(config).save_pretrained(os.path.join(broken, "text_encoder"), safe_serialization=True)
    message = r"text_encoder: the checkpoint lacks 1 of CLIPTextModelWithProjection's tensors, e.g. \['text_projection"
    with pytest.raises(CheckpointError, match=message):
        SD3PromptEncoder.from_pretrained(broken, use_t5=False)


def test_missing_mindone_says_how_to_install(pipeline_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "mindone.transformers", None)     # makes the import fail
    with pytest.raises(MissingDependencyError, match="pip install mindone==0.5.0 transformers==4.57.1"):
        SD3PromptEncoder.from_pretrained(pipeline_folder[0])


def test_import_needs_neither_mindone_nor_torch():
    code = ("import sys, ms_rm.encoders.sd3_prompts; "
            "print(sorted(m for m in ('mindone', 'torch', 'transformers') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"

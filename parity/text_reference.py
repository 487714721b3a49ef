"""Tiny SD3 text encoders and tokenizers, built on the spot, for prompt-encoding parity.

Everything is made locally (nothing is downloaded):

* CLIP tokenizers: a byte-level BPE vocabulary laid out like OpenAI CLIP's (the 256 byte
  symbols, the same with the end-of-word marker `</w>`, a few merges, then `<|startoftext|>`
  and `<|endoftext|>` as the two highest ids), saved as `vocab.json` + `merges.txt` and loaded
  by `transformers.CLIPTokenizer`, with `model_max_length` 77 like SD3's.
* The T5 tokenizer: a `tokenizers` Unigram model with T5's special-token layout (`<pad>` 0,
  `</s>` 1, `<unk>` 2), Metaspace pre-tokenizer and an `$A </s>` post-processor, wrapped in
  `transformers.T5TokenizerFast` and saved with `save_pretrained` (a `tokenizer.json`).
* Random `CLIPTextModelWithProjection` (CLIP-L-like: quick_gelu, the legacy `eos_token_id` 2
  that SD3's configs carry, so the pooled token is the argmax id; CLIP-G-like: gelu, the real
  eos id) and `T5EncoderModel` (gated-gelu, like T5 v1.1), with every bias and norm weight
  perturbed so that a weight that fails to load shows in the outputs.

`write_sd3_text_folder` saves them in a diffusers SD3 pipeline layout (`text_encoder`,
`text_encoder_2`, `text_encoder_3`, `tokenizer`, `tokenizer_2`, `tokenizer_3`, safetensors);
`reference_encode_prompt` runs diffusers' own `StableDiffusion3Pipeline.encode_prompt` on them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

CLIP_MAX_LENGTH = 77
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# A few merges so that common words become single tokens (and others stay split into bytes).
_CLIP_WORDS = ("a", "the", "cat", "dog", "red", "cube", "photo", "of", "on", "table", "blue", "sky",
               "two", "cats", "in", "and", "with", "an")
_T5_WORDS = ("a", "the", "cat", "dog", "red", "cube", "photo", "of", "on", "table", "blue", "sky",
             "two", "cats", "in", "and", "with", "an")


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _merges_for(word: str) -> Sequence[Tuple[str, str]]:
    """Left-to-right merges that build `word</w>` from its characters."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    while len(pieces) > 1:
        merges.append((pieces[0], pieces[1]))
        pieces = [pieces[0] + pieces[1]] + pieces[2:]
    return merges


def build_clip_tokenizer(folder: str, pad_token: str = CLIP_EOS):
    """A CLIPTokenizer with a small byte-level BPE vocabulary, saved to (and loaded from) `folder`.

    pad_token: `<|endoftext|>` as in SD3's `tokenizer`, `!` as in its `tokenizer_2`.
    """
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in _CLIP_WORDS:
        for a, b in _merges_for(word):
            if (a, b) not in merges:
                merges.append((a, b))
    for a, b in merges:
        if a + b not in vocab_list:
            vocab_list.append(a + b)
    vocab_list += [CLIP_BOS, CLIP_EOS]       # the two highest ids, as in OpenAI CLIP's vocabulary
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab_list)}, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)
    tokenizer.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def build_t5_tokenizer(folder: str):
    """A T5TokenizerFast over a small Unigram vocabulary, saved to (and loaded from) `folder`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    os.makedirs(folder, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + \
        [chr(c) for c in range(ord("A"), ord("Z") + 1)] + list("0123456789.,!?'-")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0 - 0.01 * i) for i, w in enumerate(_T5_WORDS)]
    vocab += [(c, -6.0) for c in chars] + [("▁" + c, -5.0) for c in chars if c.isalpha()]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>",
                                pad_token="<pad>", extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Add seeded noise to every 1-D parameter (biases, norm weights): none is left at its
    constant init, so a bias or norm weight that fails to load changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            if param.dim() == 1:
                param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def build_clip_text_encoder(tokenizer, hidden_size: int, projection_dim: int, hidden_act: str,
                            legacy_eos: bool, seed: int, num_layers: int = 2, heads: int = 4):
    """A random CLIPTextModelWithProjection sized for `tokenizer`.

    legacy_eos: config eos_token_id = 2 (SD3's text encoder configs; the pooled token is the
    position of the highest id), else the tokenizer's real eos id (the first eos position).
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        projection_dim=projection_dim, num_hidden_layers=num_layers, num_attention_heads=heads,
        max_position_embeddings=CLIP_MAX_LENGTH, hidden_act=hidden_act, layer_norm_eps=1e-5,
        attention_dropout=0.1,           # an encoder left in training mode would then show
        bos_token_id=0 if legacy_eos else tokenizer.bos_token_id,
        eos_token_id=2 if legacy_eos else tokenizer.eos_token_id, pad_token_id=1)
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config).eval()
    perturb_(model, seed)
    return model


def build_t5_encoder(tokenizer, d_model: int, seed: int, num_layers: int = 2, heads: int = 4):
    """A random T5 v1.1-style T5EncoderModel (gated-gelu, untied, dropout 0.1 as in SD3's config,
    so an encoder left in training mode shows) sized for `tokenizer`."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model,
        num_layers=num_layers, num_heads=heads, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.1,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = T5EncoderModel(config).eval()
    perturb_(model, seed)
    return model


@dataclass
class TextComponents:
    """The torch text encoders and tokenizers of a tiny SD3 pipeline (text_encoder_3 may be None)."""

    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    text_encoder_3: Optional[torch.nn.Module]
    tokenizer: object
    tokenizer_2: object
    tokenizer_3: Optional[object]


def write_sd3_text_folder(root: str, seed: int = 0, t5_width: int = 96, with_t5: bool = True,
                          clip_widths: Tuple[int, int] = (32, 48)) -> TextComponents:
    """Build tiny SD3 text encoders + tokenizers and save them under `root` in the diffusers
    pipeline layout (safetensors). Returns the torch components (in eval mode).

    The CLIP widths are concatenated and zero-padded to the T5 width, so t5_width must be at least
    their sum (SD3: 768 + 1280 <= 4096)."""
    tokenizer = build_clip_tokenizer(os.path.join(root, "tokenizer"), pad_token=CLIP_EOS)
    tokenizer_2 = build_clip_tokenizer(os.path.join(root, "tokenizer_2"), pad_token="!")
    clip_l = build_clip_text_encoder(tokenizer, clip_widths[0], clip_widths[0], "quick_gelu",
                                     legacy_eos=True, seed=seed)
    clip_g = build_clip_text_encoder(tokenizer_2, clip_widths[1], clip_widths[1], "gelu",
                                     legacy_eos=False, seed=seed + 1)
    clip_l.save_pretrained(os.path.join(root, "text_encoder"), safe_serialization=True)
    clip_g.save_pretrained(os.path.join(root, "text_encoder_2"), safe_serialization=True)
    t5 = tokenizer_3 = None
    if with_t5:
        tokenizer_3 = build_t5_tokenizer(os.path.join(root, "tokenizer_3"))
        t5 = build_t5_encoder(tokenizer_3, t5_width, seed=seed + 2)
        t5.save_pretrained(os.path.join(root, "text_encoder_3"), safe_serialization=True)
    return TextComponents(clip_l, clip_g, t5, tokenizer, tokenizer_2, tokenizer_3)


def tiny_sd3_transformer(joint_attention_dim: int, pooled_projection_dim: int):
    """A minimal SD3Transformer2DModel: diffusers reads `joint_attention_dim` from it when there is
    no text_encoder_3 (the T5 part is then zeros of that width)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=joint_attention_dim, caption_projection_dim=16,
        pooled_projection_dim=pooled_projection_dim, out_channels=4, pos_embed_max_size=8).eval()


def reference_encode_prompt(components: TextComponents, prompts: Sequence[str], max_sequence_length: int,
                            joint_attention_dim: int) -> Tuple[np.ndarray, np.ndarray]:
    """diffusers' `StableDiffusion3Pipeline.encode_prompt` (no guidance, one image per prompt,
    default clip_skip) on `components`: -> prompt_embeds (B, 77 + N, D), pooled (B, L + G)."""
    from diffusers import StableDiffusion3Pipeline

    pooled_dim = (components.text_encoder.config.projection_dim
                  + components.text_encoder_2.config.projection_dim)
    pipeline = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(joint_attention_dim, pooled_dim), scheduler=None, vae=None,
        text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        text_encoder_2=components.text_encoder_2, tokenizer_2=components.tokenizer_2,
        text_encoder_3=components.text_encoder_3, tokenizer_3=components.tokenizer_3)
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
            list(prompts), None, None, device=torch.device("cpu"), num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
    return prompt_embeds.float().numpy(), pooled.float().numpy()

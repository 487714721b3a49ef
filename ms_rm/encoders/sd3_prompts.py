"""SD3 prompt encoding in MindSpore: CLIP-L, CLIP-G and T5, as diffusers does it.

    encoder = SD3PromptEncoder.from_pretrained("stable-diffusion-3.5-medium")   # a diffusers SD3 folder
    prompt_embeds, pooled = encoder.encode(["a red cube on a table", "two cats"])
    # prompt_embeds (B, 77 + max_sequence_length, 4096), pooled (B, 768 + 1280)

This is diffusers' `StableDiffusion3Pipeline.encode_prompt(prompts, prompt_2=None, prompt_3=None,
num_images_per_prompt=1, do_classifier_free_guidance=False, clip_skip=None,
max_sequence_length=N)` (diffusers 0.36, pipeline_stable_diffusion_3.py), step for step:

* CLIP-L and CLIP-G (`CLIPTextModelWithProjection`): each tokenizer pads to, and truncates at,
  the CLIP-L tokenizer's `model_max_length` (77). Each model returns its penultimate hidden
  state (`hidden_states[-2]`) and its pooled, projected `text_embeds`.
* T5 (`T5EncoderModel`): padded to and truncated at N tokens, `</s>` added; its last hidden
  state. Without a T5 encoder (none in the folder, or `use_t5=False`) this part is zeros of shape
  (B, N, joint_attention_dim), as diffusers does with `text_encoder_3=None` (it reads
  joint_attention_dim from the transformer's config: pass it here).
* The two CLIP hidden states are concatenated on the channel axis, zero-padded to the T5 width and
  put in front of the T5 tokens: (B, 77 + N, D). pooled = cat(text_embeds_L, text_embeds_G).

The CLIP models are mindone's (`mindone.transformers`, the MindSpore port of transformers), loaded
with their `from_pretrained` from the same safetensors folders diffusers reads; T5 is ms_rm's own
(`ms_rm.encoders.t5`: transformers' T5EncoderModel computed in float32 with its weights kept in
the file's dtype); the tokenizers are transformers' own. mindone and transformers are imported
only when an encoder is built: `import ms_rm` does not need them. Note that transformers 4.57
imports torch when torch is installed (`transformers.utils.generic` does, so `import
mindone.transformers` does too); nothing here needs torch: with the environment variable
USE_TORCH=0 (or without torch installed) torch stays out of the process and encoding works the
same (checked).

How the models run: every model is called through `ms.jit` (graph mode, compiled once per batch
size; the global execution mode is left untouched), or eagerly with mode="pynative" (what
`ms-rm score-images` does, so that the text encoders' memory is freed once the prompts are
encoded; ms_rm's T5 is freed in either mode, its weights being inputs of its compiled block).
mindone's CLIP with `hidden_act="gelu"`
(CLIP-G's) calls GeluExt, which has no CPU kernel in either mode: its GELU cells are replaced by
ms_rm's portable exact GELU (`ms_rm.core.ops.gelu`, the same function, erf form). A mindone
`T5EncoderModel` passed to the constructor (a pipeline's) is called like the CLIPs.

Dtypes: the default float32 runs everywhere. bf16 does not compute on the CPU (no bf16 MatMul
or Softmax kernels): `from_pretrained(dtype=ms.bfloat16)` loads the CLIPs in float32 there
(logged), and the constructor refuses bf16 models on the CPU. float16 runs on the CPU, slowly.
T5 always computes in float32 from its stored weights, whatever `dtype` says.
Memory: T5 keeps its weights in the file's dtype (SD3.5 stores T5-XXL in fp16), half of what a
float32 T5 holds; the CLIPs are float32; use_t5=False leaves T5 out. What each part takes is
measured in docs/measurements.md ("Figures the encoder and memory docstrings quoted").

Loading is checked: every parameter of a model must have its tensor in the checkpoint (mindone
only warns and keeps a random init), so a wrong or incomplete folder raises CheckpointError.
"""

from __future__ import annotations

import logging
import os
import contextlib
import io
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn

from ..core import ops
from ..core.compile_cache import jit
from ..core.compiled import check_mode
from ..core.errors import CheckpointError, ConfigError, InputError, MissingDependencyError
from ..core.memory import release_freed_memory
from ..io.files import find_weights
from ..io.safetensors_file import open_safetensors
from .t5 import T5Encoder

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install mindone==0.5.0 transformers==4.57.1"
DEFAULT_MAX_SEQUENCE_LENGTH = 128       # T5 tokens, as the released reward model encodes prompts
MAX_T5_SEQUENCE_LENGTH = 512            # diffusers' check_inputs refuses more
CLIP_HIDDEN_LAYER = -2                  # hidden_states[-(clip_skip + 2)] with clip_skip=None

# What each subfolder of a diffusers SD3 pipeline folder must hold.
PARTS = {
    "text_encoder": "the CLIP-L text encoder (CLIPTextModelWithProjection: config.json + model.safetensors)",
    "text_encoder_2": "the CLIP-G text encoder (CLIPTextModelWithProjection: config.json + model.safetensors)",
    "text_encoder_3": "the T5 encoder (T5EncoderModel: config.json + model.safetensors, or "
                      "model.safetensors.index.json + its shards)",
    "tokenizer": "the CLIP-L tokenizer (CLIPTokenizer: vocab.json + merges.txt + tokenizer_config.json)",
    "tokenizer_2": "the CLIP-G tokenizer (CLIPTokenizer: vocab.json + merges.txt + tokenizer_config.json)",
    "tokenizer_3": "the T5 tokenizer (T5TokenizerFast: tokenizer.json or spiece.model + tokenizer_config.json)",
}

# MindSpore parameter-name endings that mindone maps from the checkpoint's (torch) names.
_MS_TO_CHECKPOINT_SUFFIX = {".gamma": ".weight", ".beta": ".bias", ".embedding_table": ".weight",
                            ".moving_mean": ".running_mean", ".moving_variance": ".running_var"}
_MINDONE_LOAD_LOGGER = "mindone.transformers.modeling_utils"


# --- optional dependencies -------------------------------------------------------------------
def _mindone_models():
    """mindone's CLIPTextModelWithProjection, or MissingDependencyError."""
    try:
        # transformers prints notes about its own model registry to stdout on import; keep
        # stdout for results (ms-rm score-images prints scores there) and log them instead.
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            from mindone.transformers import CLIPTextModelWithProjection
        if printed.getvalue().strip():
            logger.debug("importing mindone.transformers printed: %s", printed.getvalue().strip())
    except ImportError as e:
        raise MissingDependencyError(f"SD3 prompt encoding needs mindone and transformers ({e}): "
                                     f"{INSTALL_HINT}") from None
    return CLIPTextModelWithProjection


def _tokenizer_classes():
    """transformers' CLIPTokenizer and T5TokenizerFast, or MissingDependencyError."""
    try:
        from transformers import CLIPTokenizer, T5TokenizerFast
    except ImportError as e:
        raise MissingDependencyError(f"SD3 prompt encoding needs transformers' tokenizers ({e}): "
                                     f"{INSTALL_HINT}") from None
    return CLIPTokenizer, T5TokenizerFast


# --- compiled model calls ----------------------------------------------------------------------
class _ExactGelu(nn.Cell):
    """Exact (erf) GELU in ms_rm's portable spelling, in place of mindone's GELUActivation, whose
    `mint.nn.functional.gelu` (GeluExt) has no CPU kernel. The same function (erf form)."""

    def construct(self, x: Tensor) -> Tensor:
        return ops.gelu(x, approximate=False)


def use_portable_gelu(model: nn.Cell) -> int:
    """Replace every mindone `GELUActivation` cell inside `model` by `_ExactGelu`; returns how
    many. mindone's CLIP-G (hidden_act "gelu") cannot run on the CPU without this."""
    try:
        from mindone.transformers.activations import GELUActivation
    except ImportError as e:
        raise MissingDependencyError(f"SD3 prompt encoding needs mindone ({e}): {INSTALL_HINT}") from None

    replaced = 0
    for _, cell in list(model.cells_and_names()):
        for child_name, child in list(cell.name_cells().items()):
            if isinstance(child, GELUActivation):
                setattr(cell, child_name, _ExactGelu())
                replaced += 1
    return replaced


class _ClipCall(nn.Cell):
    """input_ids (B, 77) -> (text_embeds (B, P), hidden state `hidden_layer` (B, 77, H))."""

    def __init__(self, model: nn.Cell, hidden_layer: int = CLIP_HIDDEN_LAYER):
        super().__init__()
        self.model = model
        self.hidden_layer = hidden_layer

    def construct(self, input_ids: Tensor) -> Tuple[Tensor, Tensor]:
        out = self.model(input_ids, output_hidden_states=True, return_dict=False)
        return out[0], out[2][self.hidden_layer]       # (text_embeds, last_hidden_state, hidden_states)


class _T5Call(nn.Cell):
    """input_ids (B, N) -> last hidden state (B, N, D)."""

    def __init__(self, model: nn.Cell):
        super().__init__()
        self.model = model

    def construct(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids, return_dict=False)[0]


# --- the encoder -------------------------------------------------------------------------------
class SD3PromptEncoder:
    """SD3's three text encoders: prompts -> (prompt_embeds (B, 77 + N, D), pooled (B, L + G)).

    clip_l, clip_g: mindone `CLIPTextModelWithProjection` (SD3's text_encoder, text_encoder_2).
    t5: ms_rm's `T5Encoder` or a mindone `T5EncoderModel` (text_encoder_3), or None: the T5 part
        is then zeros of width `joint_attention_dim`, as in diffusers.
    tokenizer_l, tokenizer_g, tokenizer_t5: transformers tokenizers (tokenizer, tokenizer_2,
        tokenizer_3; tokenizer_t5 is None exactly when t5 is). Prompts are padded to and cut at
        tokenizer_l's `model_max_length` (77) for both CLIPs, and at N for T5.
    max_sequence_length: N, the number of T5 tokens (1 to 512).
    joint_attention_dim: D when there is no T5 (the SD3 transformer's joint_attention_dim, 4096);
        with T5, D is T5's width, as in diffusers.

    The components are used as they are (a mindone SD3 pipeline's text encoders can be passed
    in), except that they are put in inference mode and any mindone exact-GELU cell is replaced by
    ms_rm's portable one (the same function; see `use_portable_gelu`).
    """

    def __init__(self, clip_l: Any, clip_g: Any, t5: Optional[Any], tokenizer_l: Any, tokenizer_g: Any,
                 tokenizer_t5: Optional[Any], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
                 joint_attention_dim: int = 4096, mode: str = "graph"):
        _check_size("max_sequence_length", max_sequence_length, MAX_T5_SEQUENCE_LENGTH)
        check_mode(mode)
        _check_size("joint_attention_dim", joint_attention_dim)
        if (t5 is None) != (tokenizer_t5 is None):
            raise ConfigError("t5 and tokenizer_t5 go together: pass both (T5 encoding) or neither "
                              f"(a zero T5 part), got t5={type(t5).__name__}, "
                              f"tokenizer_t5={type(tokenizer_t5).__name__}")
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizer_l, self.tokenizer_g, self.tokenizer_t5 = tokenizer_l, tokenizer_g, tokenizer_t5
        self.max_sequence_length = int(max_sequence_length)
        self.joint_attention_dim = int(joint_attention_dim)
        self.clip_max_length = int(tokenizer_l.model_max_length)   # diffusers: self.tokenizer's, for both

        for name, model in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5)):
            if model is not None:
                _check_model_dtype(name, model)
        for name, model in (("clip_l", clip_l), ("clip_g", clip_g)):
            positions = model.config.max_position_embeddings
            if self.clip_max_length > positions:
                raise ConfigError(f"tokenizer_l.model_max_length is {self.clip_max_length}, more than {name}'s "
                                  f"max_position_embeddings ({positions}); SD3's CLIP tokenizers use 77")
        clip_width = clip_l.config.hidden_size + clip_g.config.hidden_size
        self.width = t5.config.d_model if t5 is not None else self.joint_attention_dim
        if clip_width > self.width:
            raise ConfigError(f"the CLIP hidden states ({clip_l.config.hidden_size} + {clip_g.config.hidden_size} "
                              f"channels) are wider than the T5 part ({self.width}): they are zero-padded "
                              "to its width, so it must be at least their sum")
        if t5 is not None and t5.config.d_model != self.joint_attention_dim:
            logger.warning("T5's width is %d, joint_attention_dim is %d: prompt embeddings take T5's width "
                           "(as in diffusers)", t5.config.d_model, self.joint_attention_dim)

        self._calls = {}
        for name, model in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5)):
            if isinstance(model, T5Encoder):       # ms_rm's own: compiles its blocks itself
                self._calls[name] = (model, model)
                continue
            if model is None:
                continue
            model.set_train(False)                 # dropout off (SD3's T5 config has dropout 0.1)
            if use_portable_gelu(model):
                logger.info("%s: mindone's exact GELU replaced by ms_rm's portable one", name)
            call = _T5Call(model) if name == "t5" else _ClipCall(model)
            compiled = jit(call.construct, call, name="construct") if mode == "graph" else call
            self._calls[name] = (call, compiled)   # keep the cell alive with its compiled call

    @classmethod
    def from_pretrained(cls, root: Union[str, os.PathLike], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
                        joint_attention_dim: int = 4096, dtype: ms.Type = ms.float32,
                        use_t5: bool = True, mode: str = "graph") -> "SD3PromptEncoder":
        """Load the text encoders and tokenizers of a diffusers SD3 / SD3.5 pipeline folder.

        root: holds text_encoder, text_encoder_2, tokenizer, tokenizer_2 and, for T5,
            text_encoder_3 and tokenizer_3 (see PARTS). Without text_encoder_3, or with
            use_t5=False, the T5 part is zeros (B, max_sequence_length, joint_attention_dim).
        dtype: float32 (default), float16 or bfloat16; bf16 is loaded as float32 on the CPU, which
            has no bf16 compute.
        mode: how the CLIPs (and a mindone T5) run: "graph" (compiled) or "pynative" (eager: the
            same numbers, and their memory is freed with the encoder; a compiled mindone model keeps
            its weights, and on the CPU a copy of them, for the life of the process).
        """
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise ConfigError(f"{root}: not a folder; expected a diffusers SD3 pipeline folder holding "
                              "text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_2 and tokenizer_3")
        if dtype not in (ms.float32, ms.float16, ms.bfloat16):
            raise ConfigError(f"dtype must be ms.float32, ms.float16 or ms.bfloat16, got {dtype}")
        dtype = ops.compute_dtype(dtype)
        for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            _require_part(root, part)
        with_t5 = use_t5 and os.path.isdir(os.path.join(root, "text_encoder_3"))
        if use_t5 and not with_t5:
            logger.warning("%s has no text_encoder_3: the T5 part of the prompt embeddings is zeros "
                           "(as diffusers does with text_encoder_3=None)", root)
        if with_t5:
            _require_part(root, "tokenizer_3")

        clip_class = _mindone_models()
        clip_tokenizer, t5_tokenizer = _tokenizer_classes()
        part = lambda name: os.path.join(root, name)  # noqa: E731
        return cls(
            _load_model(clip_class, part("text_encoder"), dtype),
            _load_model(clip_class, part("text_encoder_2"), dtype),
            T5Encoder.from_pretrained(part("text_encoder_3")) if with_t5 else None,
            _load_tokenizer(clip_tokenizer, part("tokenizer")),
            _load_tokenizer(clip_tokenizer, part("tokenizer_2")),
            _load_tokenizer(t5_tokenizer, part("tokenizer_3")) if with_t5 else None,
            max_sequence_length=max_sequence_length, joint_attention_dim=joint_attention_dim, mode=mode)

    @property
    def uses_t5(self) -> bool:
        """Whether the T5 part is encoded (else it is zeros)."""
        return self.t5 is not None

    @property
    def num_tokens(self) -> int:
        """Tokens per prompt: 77 CLIP + max_sequence_length T5."""
        return self.clip_max_length + self.max_sequence_length

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled embedding: CLIP-L's + CLIP-G's projection (768 + 1280 in SD3)."""
        return self.clip_l.config.projection_dim + self.clip_g.config.projection_dim

    def encode(self, prompts: Union[str, Sequence[str]]) -> Tuple[Tensor, Tensor]:
        """prompts (a str or a list of B str) -> (prompt_embeds (B, 77 + N, D), pooled (B, L + G)),
        in CLIP-L's dtype."""
        prompts = _check_prompts(prompts)
        pooled_l, hidden_l = self._calls["clip_l"][1](
            _token_ids(self.tokenizer_l, prompts, self.clip_max_length, "CLIP-L"))
        pooled_g, hidden_g = self._calls["clip_g"][1](
            _token_ids(self.tokenizer_g, prompts, self.clip_max_length, "CLIP-G"))
        dtype = hidden_l.dtype                         # diffusers casts both to text_encoder's dtype
        clip = mint.cat([hidden_l, hidden_g.astype(dtype)], dim=-1)
        batch, clip_tokens, clip_width = clip.shape
        if self.t5 is None:
            t5 = mint.zeros((batch, self.max_sequence_length, self.joint_attention_dim), dtype=dtype)
        else:
            t5 = self._calls["t5"][1](_token_ids(self.tokenizer_t5, prompts, self.max_sequence_length, "T5"))
            t5 = t5.astype(dtype)
        if t5.shape[-1] > clip_width:
            clip = mint.cat([clip, mint.zeros((batch, clip_tokens, t5.shape[-1] - clip_width), dtype=dtype)], dim=-1)
        prompt_embeds = mint.cat([clip, t5], dim=-2)
        pooled = mint.cat([pooled_l, pooled_g.astype(pooled_l.dtype)], dim=-1)
        return prompt_embeds, pooled

    __call__ = encode


# --- helpers -----------------------------------------------------------------------------------
def _check_size(name: str, value: Any, most: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1 or \
            (most is not None and value > most):
        limit = f"1 to {most}" if most is not None else "at least 1"
        raise ConfigError(f"{name} must be an integer, {limit}, got {value!r}")


def _check_prompts(prompts: Any, name: str = "prompts") -> List[str]:
    """A str or a non-empty list/tuple of str -> list of str, else InputError naming the argument."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InputError(f"{name} must be a str or a list of str, got {type(prompts).__name__}")
    if not prompts:
        raise InputError(f"{name} is empty: pass at least one prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InputError(f"{name}[{i}] must be a str, got {type(prompt).__name__}")
    return list(prompts)


def _check_model_dtype(name: str, model: Any) -> None:
    dtype = getattr(model, "dtype", None)
    if dtype is not None and ops.compute_dtype(dtype) != dtype:
        raise ConfigError(f"{name} is in {dtype}, which this device cannot compute in (the CPU has no bf16 "
                          "MatMul or Softmax): load it in ms.float32")


def _token_ids(tokenizer: Any, prompts: List[str], length: int, what: str) -> Tensor:
    """Token ids (B, length) as diffusers makes them: padded to `length`, cut there, special
    tokens added; a warning names the prompts that were cut."""
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                    add_special_tokens=True, return_tensors="np").input_ids
    cut = [i for i, full in enumerate(tokenizer(prompts, add_special_tokens=True).input_ids) if len(full) > length]
    if cut:
        logger.warning("prompts %s are longer than %d %s tokens and were truncated", cut, length, what)
    return Tensor(np.asarray(ids, dtype=np.int64))


def _require_part(root: str, part: str) -> str:
    folder = os.path.join(root, part)
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: missing; an SD3 pipeline folder needs {part}/ holding {PARTS[part]}")
    return folder


class _DropMissingWeightsWarning(logging.Filter):
    """mindone warns that tied weights (T5's encoder.embed_tokens = shared) are 'newly
    initialized' although they are loaded; `_check_weights` makes the real check instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "newly initialized" not in record.getMessage()


@contextmanager
def _quiet_tied_weights() -> Iterator[None]:
    log = logging.getLogger(_MINDONE_LOAD_LOGGER)
    drop = _DropMissingWeightsWarning()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def _load_model(model_class: Any, folder: str, dtype: ms.Type) -> Any:
    """A mindone model from a transformers safetensors folder, every parameter read from the file."""
    part = os.path.basename(os.path.normpath(folder))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigError(f"{folder}: no config.json; expected {PARTS.get(part, 'a transformers model folder')}")
    weights = find_weights(folder, ("model.safetensors", "model.safetensors.index.json"),
                           PARTS.get(part, "a transformers model saved as safetensors"))
    with _quiet_tied_weights():
        try:
            model = model_class.from_pretrained(folder, dtype=dtype, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise CheckpointError(f"{folder}: mindone's {model_class.__name__} cannot load it ({e})") from e
    release_freed_memory()                     # what loading freed goes back to the OS (docs/measurements.md)
    _check_weights(model, weights, folder)
    return model


def _check_weights(model: nn.Cell, weights: str, folder: str) -> None:
    """CheckpointError if a model parameter has no tensor in the checkpoint (mindone would leave
    it at its random init with a warning). Tied parameters are one Parameter, counted once."""
    reader = open_safetensors(weights)
    try:
        keys = set(reader.keys())
    finally:
        reader.close()
    missing = []
    for name, _ in model.parameters_and_names():
        candidates = {name} | {name[: -len(ms_end)] + pt_end for ms_end, pt_end in _MS_TO_CHECKPOINT_SUFFIX.items()
                               if name.endswith(ms_end)}
        if not candidates & keys:
            missing.append(name)
    if missing:
        raise CheckpointError(f"{folder}: the checkpoint lacks {len(missing)} of {type(model).__name__}'s tensors, "
                              f"e.g. {missing[:3]} (is it the right model class?)")


def _load_tokenizer(tokenizer_class: Any, folder: str) -> Any:
    try:
        return tokenizer_class.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        part = os.path.basename(os.path.normpath(folder))
        raise ConfigError(f"{folder}: {tokenizer_class.__name__} cannot load it ({e}); expected "
                          f"{PARTS.get(part, 'a tokenizer folder')}") from e

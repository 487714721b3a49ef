"""Prompts -> tokens, as ImageReward tokenizes them: BLIP's BertTokenizer (bert-base-uncased's
vocabulary plus the added [DEC] bos token and [ENC]), padded to and truncated at 35 tokens.

transformers' BertTokenizer, loaded from a local folder holding vocab.txt (no hub access); it comes
with the `images` extra and is imported only here.
"""

from __future__ import annotations

import os
from typing import Sequence, Tuple

import numpy as np

from ...core.errors import CheckpointError, InputError, MissingDependencyError


class ImageRewardTokenizer:
    def __init__(self, folder: str, max_length: int = 35):
        try:
            from transformers import BertTokenizer
        except ImportError:
            raise MissingDependencyError("tokenizing prompts for ImageReward needs transformers: "
                                         "pip install 'ms-rm[images]'") from None
        if not os.path.isfile(os.path.join(folder, "vocab.txt")):
            raise CheckpointError(f"{folder}: no vocab.txt; pass the folder of bert-base-uncased's tokenizer "
                                  "(ImageReward uses its vocabulary)")
        self.folder = folder
        self.max_length = max_length
        self.tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})                  # BLIP's init_tokenizer
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __call__(self, prompts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """input_ids (B, max_length) int64 and attention_mask (B, max_length) int64."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise InputError("prompts is empty: pass one prompt per image (or one for all)")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise InputError(f"prompts[{bad[0]}] is {type(prompts[bad[0]]).__name__}, not a string")
        out = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="np")
        return out["input_ids"].astype(np.int64), out["attention_mask"].astype(np.int64)

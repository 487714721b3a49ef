"""open_clip's tokenizer (SimpleTokenizer and `tokenize`, as the hpsv2 wheel's open_clip has them),
reimplemented without open_clip: HPSv2's `get_tokenizer('ViT-H-14')`.

* text cleaning: ftfy.fix_text (when ftfy is installed: open_clip requires it; without it ms_rm
  logs once and skips that step, which changes only text ftfy would repair: mojibake, curly
  quotes, full-width forms, ...), html.unescape twice, strip, runs of whitespace to one space,
  lower case;
* the pattern `<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`
  (case-insensitive, the `regex` module), each piece's UTF-8 bytes through the byte-to-unicode
  table, then CLIP's BPE merges;
* ids: the vocabulary open_clip derives from the merges (256 bytes, the same with '</w>', one
  per merge, then <start_of_text> 49406 and <end_of_text> 49407); each text is
  [start] + ids + [end], cut to the context length with the end token kept last, padded with 0
  (open_clip's padding; transformers' CLIPTokenizer pads with its pad token instead).

The merges come from CLIP's BPE file `bpe_simple_vocab_16e6.txt.gz` (in the open_clip and
open-clip-torch packages) or from a Hugging Face CLIP tokenizer's `merges.txt` (the same merges
after a '#version' line), or a folder holding either.
"""

from __future__ import annotations

import gzip
import html
import logging
import os
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ...core.errors import ConfigError, InputError, MissingDependencyError

logger = logging.getLogger(__name__)

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES_FILE = "merges.txt"
NUM_MERGES = 49152 - 256 - 2
SOT, EOT = "<start_of_text>", "<end_of_text>"
CONTEXT_LENGTH = 77


@lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _pairs(word: Tuple[str, ...]):
    return {(a, b) for a, b in zip(word[:-1], word[1:])}


def find_vocabulary(path: str) -> str:
    """The BPE file or merges.txt at `path` (a file, or a folder holding one)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in (BPE_FILE, MERGES_FILE):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise ConfigError(f"{path}: no {BPE_FILE} or {MERGES_FILE} here; pass CLIP's BPE file (from the open_clip "
                          f"package) or a Hugging Face CLIP tokenizer folder (e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such tokenizer file or folder")
    return path


def read_merges(path: str) -> List[Tuple[str, str]]:
    path = find_vocabulary(path)
    try:
        if path.endswith(".gz"):
            with gzip.open(path) as f:
                text = f.read().decode("utf-8")
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ConfigError(f"{path}: cannot read CLIP's BPE merges ({type(e).__name__}: {e})") from None
    lines = text.split("\n")[1:NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    bad = [i for i, m in enumerate(merges) if len(m) != 2]
    if len(merges) != NUM_MERGES or bad:
        raise ConfigError(f"{path}: not CLIP's BPE merges (expected {NUM_MERGES} lines of two symbols after the first "
                          f"line, got {len(merges)}{f', line {bad[0] + 2} malformed' if bad else ''})")
    return merges


class OpenCLIPTokenizer:
    """open_clip's SimpleTokenizer + tokenize, from CLIP's BPE merges (see the module doc)."""

    def __init__(self, path: str, context_length: int = CONTEXT_LENGTH):
        try:
            import regex
        except ImportError:
            raise MissingDependencyError("HPSv2's tokenizer needs the regex module: pip install 'ms-rm[images]'") from None
        self.path = find_vocabulary(path)
        merges = read_merges(self.path)
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {SOT: SOT, EOT: EOT}
        self.pat = regex.compile(SOT + "|" + EOT + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)
        self._whitespace = regex.compile(r"\s+")
        self.sot, self.eot = self.encoder[SOT], self.encoder[EOT]
        self.context_length = context_length
        self.vocab_size = len(self.encoder)
        try:
            import ftfy
            self._fix_text = ftfy.fix_text
        except ImportError:
            self._fix_text = None
            logger.warning("ftfy is not installed: HPSv2's tokenizer skips open_clip's ftfy.fix_text (only text "
                           "ftfy would repair tokenizes differently); pip install ftfy")

    def clean(self, text: str) -> str:
        if self._fix_text is not None:
            text = self._fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return self._whitespace.sub(" ", text).strip().lower()

    def bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: List[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        for token in self.pat.findall(self.clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token).split(" "))
        return ids

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(B, context_length) int64 ids, as open_clip's tokenize(texts)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise InputError(f"prompts[{bad[0]}] is a {type(texts[bad[0]]).__name__}, not a string")
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for i, text in enumerate(texts):
            tokens = [self.sot] + self.encode(text) + [self.eot]
            if len(tokens) > self.context_length:
                tokens = tokens[:self.context_length]
                tokens[-1] = self.eot
            out[i, :len(tokens)] = tokens
        return out

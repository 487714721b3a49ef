"""Scores kept per sample on disk, so an interrupted or extended evaluation scores nothing twice.

One JSON-lines file per reward: a first line {"reward": description} (which model, which options:
a file written for another reward is refused), then {"key": ..., "score": ...} per sample,
appended and flushed a chunk at a time. A run killed mid-write leaves at most a partial last line,
which the next run drops (with a warning) before it appends: every score written whole is kept.
Lines are split on "\\n" only (JSON escapes it inside strings; a prompt may hold other line breaks).

Under msrun every rank reads the file with the same checks (`writer=False` on all but the main
rank: nothing is written or truncated there), so every rank sees the same scores or fails alike.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Iterable, Mapping, Tuple

from ..core.errors import InputError

logger = logging.getLogger(__name__)


class ScoreCache:
    def __init__(self, path: str, description: Mapping, writer: bool = True):
        self.path, self.writer = path, writer
        self.description = json.loads(json.dumps(dict(description)))
        self.scores: Dict[str, float] = {}
        if os.path.exists(path):
            self._read()
        elif writer:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._append_lines([{"reward": self.description}])

    def __contains__(self, key: str) -> bool:
        return key in self.scores

    def __getitem__(self, key: str) -> float:
        return self.scores[key]

    def add(self, items: Iterable[Tuple[str, float]]) -> None:
        """Record scores (written to the file by the writer only)."""
        rows = [{"key": key, "score": float(score)} for key, score in items]
        if self.writer:
            self._append_lines(rows)
        self.scores.update((row["key"], row["score"]) for row in rows)

    def _read(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]             # whole lines only
        if len(complete) < len(data) and self.writer:
            logger.warning("%s: dropping a partial last line (an interrupted run); %d bytes",
                           self.path, len(data) - len(complete))
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        lines = complete.decode("utf-8").split("\n")[:-1]
        if not lines:
            if self.writer:
                self._append_lines([{"reward": self.description}])
            return
        try:
            header = json.loads(lines[0])["reward"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{self.path}: not a score cache of ms-rm eval (no reward line first); "
                             "move it away or choose another output folder") from None
        if header != self.description:
            raise InputError(f"{self.path}: scores of another reward ({header}), not of {self.description}; "
                             "choose another output folder, or delete the file to score again")
        for number, line in enumerate(lines[1:], start=2):
            try:
                row = json.loads(line)
                self.scores[row["key"]] = float(row["score"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise InputError(f"{self.path}:{number}: not a cached score line; the cache is damaged, "
                                 "delete it to score again") from None

    def _append_lines(self, rows) -> None:
        if not rows:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())

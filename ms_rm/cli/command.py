"""One command of `ms-rm`, as data: its help, description, arguments and run function.

The registry-driven commands (`ms-rm score --reward NAME`, `ms-rm convert --reward NAME`,
ms_rm.cli.rewards) and the older per-model names (`score-images`, `score-clip`,
`score-imagereward`, `convert-imagereward`) are built from the same `Command`s, so an alias
parses and runs exactly as the registry command does.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Command:
    help: str                                                   # one line, for `ms-rm --help`
    description: str                                            # for the command's own --help
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]

    def add_arguments_to(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        self.add_arguments(parser)
        parser.set_defaults(func=self.run)
        return parser

    def add_to(self, sub, name: str) -> argparse.ArgumentParser:
        """The command as subcommand `name` of `sub` (an add_subparsers action)."""
        return self.add_arguments_to(sub.add_parser(name, help=self.help, description=self.description))

"""Entry point of the ``gift-fast`` command.

Sub-commands live one per file in this package and are imported only when
invoked, so ``gift-fast --help`` stays fast (no torch import) and a broken
optional dependency of one command does not break the others.
"""
from __future__ import annotations

import importlib

import click

# command name -> "module:attribute" inside gift_fast.cli
COMMANDS = {
    "synth": "gift_fast.cli.synth:synth",
    "train": "gift_fast.cli.train:train",
    "eval": "gift_fast.cli.train:evaluate_cmd",
    "report": "gift_fast.cli.report:report",
    "data": "gift_fast.cli.data:data",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        module = importlib.import_module(module_name)
        return getattr(module, attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="gift-fast")
def main():
    """gift-fast: continual fine-tuning of CLIP with synthetic replay (GIFT)."""


if __name__ == "__main__":  # pragma: no cover
    main()

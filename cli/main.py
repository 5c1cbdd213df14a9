"""Entry point of the ``gift-fast`` command.

Sub-commands live one per file in this package and are imported only when
invoked, so ``gift-fast --help`` stays fast (no torch import) and a broken
optional dependency of one command does not break the others.
"""
from __future__ import annotations

import importlib
import os

import click

# command name -> "module:attribute" inside gift_fast.cli
COMMANDS = {
    "synth": "gift_fast.cli.synth:synth",
    "train": "gift_fast.cli.train:train",
    "eval": "gift_fast.cli.train:evaluate_cmd",
    "report": "gift_fast.cli.report:report",
    "data": "gift_fast.cli.data:data",
}


def expected_errors() -> tuple:
    """Failures a user can fix (a bad file, a bad value, a full disk, a permission, a missing model): one line.

    Anything else (a bug) keeps its traceback. ``EOFError`` is here because click would
    otherwise read it as Ctrl-D and print only "Aborted!" (a truncated file raises it).
    """
    kinds = [OSError, ValueError, EOFError, FloatingPointError]
    try:
        from PIL import Image

        kinds.append(Image.DecompressionBombError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(kinds)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, EOFError):
        msg = f"a file ended early (truncated or empty): {msg}"
    return msg


class LazyGroup(click.Group):
    def invoke(self, ctx):
        """Every command's expected failures become ``Error: <sentence>`` and exit status 1; set
        GIFT_FAST_TRACEBACK=1 to see the traceback of those too."""
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except expected_errors() as e:
            if os.environ.get("GIFT_FAST_TRACEBACK") == "1":
                raise
            raise click.ClickException(_one_line(e)) from None


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

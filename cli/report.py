"""``gift-fast report RUN...``: the paper-style tables of finished runs, printed and written as Markdown."""
from __future__ import annotations

import click


@click.command("report")
@click.argument("runs", nargs=-1, required=True)
@click.option("--markdown", "-o", default=None,
              help="Write the tables here (default: <RUN>/report.md for one folder argument, else report.md).")
@click.option("--no-seed-average", is_flag=True, help="One row per run instead of averaging runs that differ "
              "only in their seed.")
def report(runs, markdown, no_seed_average):
    """Transfer / Avg / Last (overall and per data set) of one run or several side by side.

    A RUN is a run folder of `gift-fast train --out` (or a folder of several, e.g. the tiny
    preset's), or its acc_matrix.csv. Runs with the same method label and tasks are
    averaged over their seeds (mean ± standard deviation).
    """
    import os

    from gift_fast.report import report as make_report

    if markdown is None:
        markdown = os.path.join(runs[0], "report.md") if len(runs) == 1 and os.path.isdir(runs[0]) else "report.md"
    from gift_fast.validation import OptionError, check_output_file

    try:
        check_output_file("--markdown/-o", markdown)     # before reading the runs
    except OptionError as e:
        raise click.BadParameter(str(e)) from None
    try:
        text = make_report(list(runs), markdown=markdown, by_seed=not no_seed_average)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(text)
    click.echo(f"(written to {markdown})", err=True)

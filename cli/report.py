"""``gift-fast report RUN...``: the paper-style tables of finished runs, printed and written as Markdown."""
from __future__ import annotations

import os

import click


@click.command("report")
@click.argument("runs", nargs=-1, required=True)
@click.option("--markdown", "-o", default=None,
              help="Write the tables here (default: <RUN>/report.md for one folder argument, else report.md).")
@click.option("--no-seed-average", is_flag=True, help="One row per run instead of averaging runs that differ "
              "only in their seed.")
@click.option("--no-paper", is_flag=True, help="Leave out the paper's published rows beside the runs.")
@click.option("--curves", is_flag=True, help="Also draw the --track curves (the paper's Fig. 4 and Fig. 5) of the "
              "runs, overlaid: curves.png next to the Markdown report.")
def report(runs, markdown, no_seed_average, no_paper, curves):
    """Transfer / Avg / Last (overall and per data set) of one run or several side by side.

    A RUN is a run folder of `gift-fast train --out` (or a folder of several, e.g. the tiny
    preset's), or its acc_matrix.csv. Runs with the same method label and tasks are
    averaged over their seeds (mean ± standard deviation). Where a run follows the paper's MTIL
    protocol, the paper's published row for its configuration is printed beside it, with the
    difference (gift_fast.paper).
    """
    from gift_fast.report import report as make_report

    if markdown is None:
        markdown = os.path.join(runs[0], "report.md") if len(runs) == 1 and os.path.isdir(runs[0]) else "report.md"
    from gift_fast.validation import OptionError, check_output_file

    try:
        check_output_file("--markdown/-o", markdown)     # before reading the runs
    except OptionError as e:
        raise click.BadParameter(str(e)) from None
    try:
        text = make_report(list(runs), markdown=markdown, by_seed=not no_seed_average, paper=not no_paper)
        figure = None
        if curves:
            from gift_fast.report import expand_run_paths, load_run
            from gift_fast.tracking import plot_curves

            folders = expand_run_paths(list(runs))
            labels = [load_run(f).label for f in folders]
            if len(set(labels)) < len(labels):          # several seeds of one method: tell them apart
                labels = [f"{lab} ({f.name})" for lab, f in zip(labels, folders)]
            figure = plot_curves(list(zip(labels, folders)),
                                 os.path.join(os.path.dirname(os.path.abspath(markdown)), "curves.png"))
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(text)
    click.echo(f"(written to {markdown})", err=True)
    if figure is not None:
        click.echo(f"(curves drawn in {figure})", err=True)

"""``gift-fast data``: is the MTIL data where torchvision expects it, and build its pixel caches.

torch / torchvision are imported inside the commands so that ``gift-fast --help`` stays fast.
"""
from __future__ import annotations

import os

import click


@click.group()
def data():
    """The 11 MTIL data sets: check their folders, build their caches."""


def _tasks_option(f):
    return click.option("--task", "tasks", multiple=True, metavar="NAME",
                         help="Only this task (repeatable; default: all 11 MTIL tasks).")(f)


def _resolve_tasks(tasks):
    from gift_fast.config import MTIL_TASKS
    unknown = [t for t in tasks if t not in MTIL_TASKS]
    if unknown:
        raise click.BadParameter(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(MTIL_TASKS)}",
                                 param_hint="--task")
    return list(tasks) if tasks else list(MTIL_TASKS)


def _fmt_count(n):
    return "-" if n is None else f"{n:,}"


@data.command()
@click.option("--data-root", required=True, type=click.Path(file_okay=False), help="Folder holding all data sets.")
@click.option("--download", is_flag=True, help="Let torchvision download what it can (not StanfordCars).")
@_tasks_option
def check(data_root, download, tasks):
    """Say, for each data set, whether it is there, its train/test sizes, and, if it is not, the
    exact folder layout torchvision expects. Exits with status 1 if any is missing."""
    from gift_fast.data.mtil import LAYOUTS, check_task_data
    tasks = _resolve_tasks(tasks)
    root = os.path.abspath(os.path.expanduser(data_root))
    if not os.path.isdir(root) and not download:
        click.echo(f"note: {root} does not exist (yet)", err=True)
    rows = [check_task_data(t, root, download=download) for t in tasks]
    header = ("task", "present", "train", "test", "split")
    table = [header] + [(r["task"], "yes" if r["present"] else "NO", _fmt_count(r["train"]), _fmt_count(r["test"]),
                         r["split"] or "-") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    click.echo(f"data root: {root}")
    for k, row in enumerate(table):
        cells = [c.ljust(w) if i in (0, 1, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        click.echo("  ".join(cells).rstrip())
        if k == 0:
            click.echo("  ".join("-" * w for w in widths))
    missing = [r for r in rows if not r["present"]]
    for r in missing:
        click.echo("")
        click.echo(f"{r['task']}: {r['problem'].splitlines()[0] if r['problem'] else 'not found'}")
        click.echo("  torchvision expects (DIR = the data root):")
        for line in LAYOUTS[r["task"]].replace("DIR", root).splitlines():
            click.echo(f"    {line}")
    click.echo("")
    click.echo(f"{len(rows) - len(missing)} of {len(rows)} data sets present.")
    if missing:
        raise SystemExit(1)


@data.command()
@click.option("--data-root", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--cache-dir", required=True, type=click.Path(file_okay=False),
              help="Where the uint8 caches go (about 150 KB per image at 224 px).")
@click.option("--image-size", default=224, show_default=True, type=int)
@click.option("--split-seed", default=42, show_default=True, type=int,
              help="Seed of the 80/20 split of Caltech101, EuroSAT, SUN397.")
@click.option("--split-record-dir", default=None, type=click.Path(file_okay=False),
              help="Write (or check) <task>-split.json of the seeded splits here (the run folder).")
@click.option("--num-workers", default=None, type=int, help="Decoding workers (default: min(8, CPUs)).")
@_tasks_option
def cache(data_root, cache_dir, image_size, split_seed, split_record_dir, num_workers, tasks):
    """Decode and resize every train and test image once into the cache (what training and the
    evaluations then read), so that the GPU run does not spend its time decoding JPEGs."""
    from gift_fast.data.mtil import build_task
    from gift_fast.validation import OptionError, check_data_options

    try:
        check_data_options(image_size=image_size, num_workers=num_workers)
    except OptionError as e:
        raise click.BadParameter(str(e)) from None
    for t in _resolve_tasks(tasks):
        try:
            spec = build_task(t, data_root, image_size=image_size, cache_dir=cache_dir, split_seed=split_seed,
                              split_record_dir=split_record_dir, num_workers=num_workers)
        except (ValueError, OSError, RuntimeError) as e:   # missing folder, full disk, corrupt image: say which
            raise click.ClickException(f"{t}: {e}") from None
        state = ", ".join(f"{p} {len(getattr(spec, p)):,} ({'built' if getattr(spec, p).built else 'cached'})"
                          for p in ("train", "test"))
        click.echo(f"{t}: {state}")

"""Paper-style tables from run folders: numbers, seed averaging, plots, errors."""
import json

import numpy as np
import pytest

from gift_fast.metrics import continual_metrics
from gift_fast.report import load_run, plot_run, report, report_tables
from gift_fast.run_folder import write_acc_csv


def fake_run(folder, label, seed, zero, acc, tasks=("A", "B", "C")):
    folder.mkdir(parents=True)
    write_acc_csv(folder / "acc_matrix.csv", list(tasks), zero, acc[:])
    (folder / "config.json").write_text(json.dumps({"label": label, "config": {"seed": seed}}))
    return folder


ZERO = [50.0, 60.0, 70.0]
GIFT0 = [[80.0, 58.0, 69.0], [78.0, 90.0, 68.0], [77.0, 88.0, 95.0]]
GIFT1 = [[82.0, 56.0, 67.0], [80.0, 92.0, 66.0], [79.0, 86.0, 97.0]]
FT0 = [[85.0, 30.0, 40.0], [20.0, 95.0, 35.0], [10.0, 25.0, 99.0]]


def test_summary_and_per_task_tables_hold_the_metrics(tmp_path):
    fake_run(tmp_path / "g0", "gift", 0, ZERO, GIFT0)
    fake_run(tmp_path / "g1", "gift", 1, ZERO, GIFT1)
    fake_run(tmp_path / "f0", "finetune", 0, ZERO, FT0)
    text = report([str(tmp_path)], markdown=str(tmp_path / "r.md"))
    g = [continual_metrics(GIFT0), continual_metrics(GIFT1)]
    f = continual_metrics(FT0)
    z = continual_metrics([ZERO] * 3)
    assert f"| Zero-shot (3 tasks) | | {z['transfer']:.1f} | {z['avg']:.1f} | {z['last']:.1f} |" in text
    mt = np.mean([m["transfer"] for m in g])
    st = np.std([m["transfer"] for m in g], ddof=1)
    assert f"| gift | 2 | {mt:.1f} ± {st:.1f} |" in text
    assert f"| finetune | 1 | {f['transfer']:.1f} | {f['avg']:.1f} | {f['last']:.1f} |" in text
    # per data set: Last of task B for finetune is acc[2][1]; Transfer of B is acc[0][1]; first column empty
    last_rows = text.split("## Last per data set")[1]
    assert "| finetune | 10.0 | 25.0 | 99.0 | 44.7 |" in last_rows
    transfer_rows = text.split("## Transfer per data set")[1].split("##")[0]
    assert "| finetune |  | 30.0 | 37.5 | 33.8 |" in transfer_rows
    assert (tmp_path / "r.md").read_text().startswith("# gift-fast report")


def test_without_seed_averaging_every_run_is_a_row(tmp_path):
    a = fake_run(tmp_path / "g0", "gift", 0, ZERO, GIFT0)
    b = fake_run(tmp_path / "g1", "gift", 1, ZERO, GIFT1)
    text = report_tables([load_run(a), load_run(b)], by_seed=False)
    assert "| gift (g0) | 1 |" in text and "| gift (g1) | 1 |" in text


def test_one_task_sequence_has_no_transfer(tmp_path):
    r = fake_run(tmp_path / "one", "gift", 0, [40.0], [[90.0]], tasks=("A",))
    text = report([str(r)])
    assert "| gift | 1 | - | 90.0 | 90.0 |" in text


def test_unfinished_or_foreign_folders_are_clear_errors(tmp_path):
    fake_run(tmp_path / "half", "gift", 0, ZERO, GIFT0[:1])
    with pytest.raises(ValueError, match="not finished.*--resume"):
        report([str(tmp_path / "half")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no gift-fast run"):
        report([str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        report([str(tmp_path / "nope")])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "acc_matrix.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="not an accuracy matrix"):
        load_run(tmp_path / "bad")


def test_plots_are_written(tmp_path):
    r = fake_run(tmp_path / "g0", "gift", 0, ZERO, GIFT0)
    paths = plot_run(r)
    assert [p.name for p in paths] == ["acc_matrix.png", "acc_curves.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_report_command(tmp_path):
    from click.testing import CliRunner

    from gift_fast.cli.main import main

    fake_run(tmp_path / "runs" / "g0", "gift", 0, ZERO, GIFT0)
    r = CliRunner().invoke(main, ["report", str(tmp_path / "runs")])
    assert r.exit_code == 0 and "| gift | 1 |" in r.output
    assert (tmp_path / "runs" / "report.md").is_file()
    r = CliRunner().invoke(main, ["report", str(tmp_path / "missing")])
    assert r.exit_code != 0 and "no such run folder" in r.output

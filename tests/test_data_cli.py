"""`gift-fast data check` and `gift-fast data cache` on fake folders in torchvision's layouts."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from gift_fast.cli.main import main
from gift_fast.config import MTIL_TASKS
from fake_datasets import make_fake_mtil_root, relaxed_md5_checks


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtil_cli")
    return str(root), make_fake_mtil_root(str(root))


def _rows(output):
    """task -> (present, train, test) from the table."""
    rows = {}
    for line in output.splitlines():
        m = re.match(r"^(\w+)\s+(yes|NO)\s+([\d,]+|-)\s+([\d,]+|-)\s", line + " ")
        if m and m.group(1) in MTIL_TASKS:
            rows[m.group(1)] = (m.group(2), m.group(3), m.group(4))
    return rows


def test_check_all_present(fake_root):
    root, sizes = fake_root
    with relaxed_md5_checks():
        res = CliRunner().invoke(main, ["data", "check", "--data-root", root])
    assert res.exit_code == 0, res.output
    rows = _rows(res.output)
    assert set(rows) == set(MTIL_TASKS)
    for task, (tr, te) in sizes.items():
        assert rows[task] == ("yes", f"{tr:,}", f"{te:,}"), task
    assert "11 of 11 data sets present" in res.output
    assert "seeded 80%/20%, seed 42" in res.output and "trainval / test" in res.output


def test_check_reports_missing_with_layout(tmp_path, fake_root):
    root, sizes = fake_root
    empty = tmp_path / "data"
    empty.mkdir()
    res = CliRunner().invoke(main, ["data", "check", "--data-root", str(empty)])
    assert res.exit_code == 1
    rows = _rows(res.output)
    assert all(v[0] == "NO" for v in rows.values()) and len(rows) == 11
    assert f"{empty}/food-101/meta/train.json" in res.output
    assert f"{empty}/stanford_cars/cars_test_annos_withlabels.mat" in res.output
    assert f"{empty}/SUN397/ClassName.txt" in res.output
    assert "0 of 11 data sets present" in res.output
    assert list(empty.iterdir()) == []
    # Without the relaxed md5 check, fake CIFAR-100 fails torchvision's md5 test: reported, not crashed.
    res = CliRunner().invoke(main, ["data", "check", "--data-root", root, "--task", "CIFAR100", "--task", "Food"])
    assert res.exit_code == 1
    rows = _rows(res.output)
    assert rows["CIFAR100"][0] == "NO" and rows["Food"][0] == "yes"
    assert "corrupted" in res.output


def test_unknown_task_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(main, ["data", "check", "--data-root", str(tmp_path), "--task", "Birds"])
    assert res.exit_code == 2 and "unknown task" in res.output and "SUN397" in res.output


def test_cache_command_builds_then_reuses(fake_root, tmp_path):
    root, sizes = fake_root
    args = ["data", "cache", "--data-root", root, "--cache-dir", str(tmp_path / "c"), "--image-size", "16",
            "--num-workers", "0", "--task", "MNIST", "--task", "EuroSAT", "--split-record-dir", str(tmp_path / "run")]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert f"MNIST: train {sizes['MNIST'][0]:,} (built), test {sizes['MNIST'][1]:,} (built)" in first.output
    assert (tmp_path / "run" / "EuroSAT-split.json").exists()
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0 and "(built)" not in second.output and "(cached)" in second.output

"""The paper beside the run: the transcribed tables are consistent, a run on the paper's protocol gets
its published row (with the difference), a run that is not (the tiny preset) gets none, and says why."""
import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from gift_fast import paper
from gift_fast.cli.main import main
from gift_fast.config import ORDERS
from gift_fast.report import report
from gift_fast.run_config import PRESETS
from gift_fast.train import resolve_method, TrainConfig


@pytest.mark.parametrize("order", [1, 2])
def test_per_task_averages_equal_the_summary_tables(order):
    """Tab. 9 / 10's "Average" column is Tab. 1 / 2: a check of the transcription (a slip in one shows)."""
    per = paper.MTIL_PER_TASK[order]
    for metric, col in (("transfer", 0), ("avg", 1), ("last", 2)):
        for row, vals in per[metric].items():
            assert vals[-1] == paper.MTIL_SUMMARY[order][row][col], (order, metric, row)
            n = 10 if metric == "transfer" else 11
            assert len(vals) == n + 1
            # entries and average are each rounded to 0.1: they agree within 0.1
            assert abs(np.mean(vals[:-1]) - vals[-1]) <= 0.1 + 1e-9, (order, metric, row)
    assert per["zero_shot"][-1] == paper.MTIL_SUMMARY[order]["Zero-shot"][1]
    zs = dict(zip(ORDERS[order], per["zero_shot"]))
    other = dict(zip(ORDERS[3 - order], paper.MTIL_PER_TASK[3 - order]["zero_shot"]))
    assert zs == other                  # the same initial CLIP in both orders


def test_cil_alias_is_the_paper_module():
    from gift_fast.data import cil

    assert cil.SEED_RESULTS is paper.CIL_RESULTS and cil.SEED_TABLE_NAMES is paper.CIL_TABLE_NAMES


def _match(order=1, method="gift", **kw):
    cfg = TrainConfig(order=order, method=method, **kw)
    spec = cfg.method_spec()
    return paper.paper_rows(dataclasses.asdict(cfg), dataclasses.asdict(spec), ORDERS[order])


def test_rows_of_each_configuration():
    rows = lambda m: {(r.table, r.row) for r in m.rows}  # noqa: E731
    assert rows(_match()) == {("Tab. 1", "GIFT (Ours)"), ("Tab. 3", "+CD +ITA +AWC"), ("Tab. 6", "AWC")}
    assert rows(_match(2)) == {("Tab. 2", "GIFT (Ours)")}
    assert rows(_match(method="finetune")) == {("Tab. 1", "Continual Finetune")}
    assert rows(_match(method="l2")) == {("Tab. 1", "baseline"), ("Tab. 3", "Baseline")}
    assert rows(_match(method="l2", cd=True, ita=True)) == {
        ("Tab. 3", "+CD +ITA"), ("Tab. 4a", "Contrastive"), ("Tab. 4b", "Last CLIP"), ("Tab. 4c", "ITA scale 0.25"),
        ("Tab. 5", "GIFT, Synthetic, 1K")}
    assert rows(_match(method="l2", cd=True)) == {("Tab. 3", "+CD"), ("Tab. 4c", "ITA scale 0")}
    # Tab. 4a's feature distance ran with ITA beside it (the authors' --feature_mse, as gift_fast.step computes it)
    assert rows(_match(method="l2", cd=True, ita=True, distill="feature")) == {("Tab. 4a", "Feat. Dist.")}
    assert rows(_match(method="l2", cd=True, ita=False, distill="feature")) == set()
    assert rows(_match(method="l2", cd=True, ita=True, teacher="wise:0.2")) == {("Tab. 4b", "WiSE(0.2)")}
    assert rows(_match(method="ewc-v", fisher_batches=2)) == {("Tab. 6", "EWC-V, 128 samples")}
    assert rows(_match(method="l2", cd=True, ita=True, images_per_task=3000, reference_images="x")) == {
        ("Tab. 5", "GIFT, ImageNet, 3K")}
    assert rows(_match(synth="on-the-fly", sd_steps=25)) == {("Tab. 11", "GIFT w/ AWC, 25 steps")}
    assert rows(_match(ita_weight=0.5)) == set()          # no published row (on the protocol, though)
    assert _match(ita_weight=0.5).on_protocol
    m = _match(steps=500, model="ViT-B-32")
    assert not m.on_protocol and m.rows == []
    assert any("steps 500" in d for d in m.differences) and any("ViT-B-32" in d for d in m.differences)


def _fake_run(folder, cfg: TrainConfig, tasks, zero, acc):
    folder.mkdir(parents=True)
    lines = ["after," + ",".join(tasks), "zero-shot," + ",".join(f"{v:.4f}" for v in zero)]
    lines += [f"{t}," + ",".join(f"{v:.4f}" for v in row) for t, row in zip(tasks, acc)]
    (folder / "acc_matrix.csv").write_text("\n".join(lines) + "\n")
    spec = cfg.method_spec()
    (folder / "config.json").write_text(json.dumps({
        "config": dataclasses.asdict(cfg), "method": dataclasses.asdict(spec), "label": spec.label(),
        "tasks": list(tasks)}))


def test_report_shows_the_paper_for_order_I(tmp_path):
    """A faked Order I GIFT run: the report prints Tab. 1's row, the run's numbers and the difference,
    and Tab. 9 per data set."""
    tasks = list(ORDERS[1])
    zero = list(paper.MTIL_PER_TASK[1]["zero_shot"][:-1])          # the paper's zero-shot accuracies
    rng = np.random.default_rng(0)
    acc = [[float(rng.uniform(40, 95)) for _ in tasks] for _ in tasks]
    _fake_run(tmp_path / "order1", TrainConfig(order=1), tasks, zero, acc)
    text = report([str(tmp_path / "order1")])
    assert "## Beside the paper" in text and "MTIL Order I)" in text
    assert "| paper, Tab. 1: GIFT (Ours) = Tab. 3: +CD +ITA +AWC = Tab. 6: AWC | 69.3 | 77.3 | 86.0 |" in text
    from gift_fast.metrics import continual_metrics

    m = continual_metrics(acc)
    assert f"| this run | {m['transfer']:.1f} | {m['avg']:.1f} | {m['last']:.1f} |" in text
    assert f"| difference (run - paper) | {m['transfer'] - 69.3:+.1f} | {m['avg'] - 77.3:+.1f} | " \
           f"{m['last'] - 86.0:+.1f} |" in text
    # the zero-shot row: the same accuracies as the paper's per data set; the metrics of the paper
    zs = continual_metrics([zero] * len(zero))
    assert "| paper, Tab. 1: Zero-shot | 69.4 | 65.3 | 65.3 |" in text
    assert round(zs["transfer"], 1) == 69.4 and round(zs["avg"], 1) == 65.3     # Tab. 1 from Tab. 9's row
    assert "| difference (run - paper) | +0.0 | +0.0 | +0.0 |" in text
    # Tab. 9, per data set
    assert "| Tab. 9: GIFT (Ours) | Aircraft | Caltech101 |" in text
    assert "| Last, paper | 47.9 | 95.6 | 82.8 |" in text
    last_run = " | ".join(f"{v:.1f}" for v in acc[-1])
    assert f"| Last, run | {last_run} |" in text
    assert "| Transfer, paper | - | 88.5 | 69.8 |" in text
    assert "| Zero-shot accuracy, difference | +0.0 | +0.0 |" in text


def test_report_shows_no_paper_row_for_the_tiny_preset(tmp_path):
    tasks = ["ToyDigits", "ToyShapes", "ToyColours"]
    cfg = TrainConfig(**PRESETS["tiny"])
    _fake_run(tmp_path / "tiny", cfg, tasks, [50.0, 60.0, 70.0], [[80, 60, 70], [70, 90, 70], [60, 80, 95]])
    text = report([str(tmp_path / "tiny")])
    assert "No published row" in text and "toy-vit" in text and "steps 150" in text
    assert "paper, Tab." not in text
    r = CliRunner().invoke(main, ["report", str(tmp_path / "tiny"), "--no-paper"])
    assert r.exit_code == 0 and "Beside the paper" not in r.output


def test_resolve_method_labels_still_match():
    assert resolve_method("l2", cd=True, ita=True).label() == "l2 +CD +ITA"

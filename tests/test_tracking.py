"""--report-to tensorboard|wandb (every log.jsonl record, every evaluation row, the figure) and --track curves."""
import json
import sys

import pytest
import torch

from gift_fast.tracking import parse_report_to, plot_curves, read_curves
from toy_runs import init_checkpoint, toy_run_config
from gift_fast.train import ContinualTrainer


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    return init_checkpoint(tmp_path_factory, seed=123)


def cfg_for(tmp_path, init_ckpt, folder="run", **kw):
    return toy_run_config(tmp_path / folder, init_ckpt,
                          **{"steps": 4, "images_per_task": 12, "log_every": 2, "keep_synth": False, **kw})


def _log_records(out):
    with open(out / "log.jsonl") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _tb_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc, {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_parse_report_to():
    assert parse_report_to(None) == [] and parse_report_to("none") == []
    assert parse_report_to("tensorboard") == ["tensorboard"]
    assert parse_report_to("all") == ["tensorboard", "wandb"]
    assert parse_report_to("wandb,tensorboard") == ["wandb", "tensorboard"]
    with pytest.raises(ValueError, match="--report-to 'mlflow'"):
        parse_report_to("mlflow")


def test_tensorboard_scalars_equal_log_jsonl(tmp_path, init_ckpt):
    pytest.importorskip("tensorboard")
    cfg = cfg_for(tmp_path, init_ckpt, report_to="tensorboard", name="tb-test", plots=True)
    metrics = ContinualTrainer(cfg).run()
    out = tmp_path / "run"
    acc, scalars = _tb_scalars(out / "tensorboard")
    recs = _log_records(out)
    assert len(recs) == 4                                     # 2 tasks x (steps 2 and 4)
    n_checked = 0
    for rec in recs:
        gstep = rec["task_index"] * cfg.steps + rec["step"]
        for key, v in rec.items():
            if key in ("task", "task_index", "step", "time") or v is None:
                continue
            assert scalars[f"train/{key}"][gstep] == pytest.approx(v, rel=1e-6), (key, gstep)
            n_checked += 1
    assert n_checked >= 4 * 5                                 # lr, loss_ce, loss_kd, loss_awc, throughput ...
    # every evaluation row: zero-shot at 0, then after each task at its last step
    with open(out / "state.json") as fh:
        state = json.load(fh)
    for t, row in enumerate([state["zero_shot"]] + state["acc"]):
        for name, a in zip(state["tasks"], row):
            assert scalars[f"eval/{name}"][t * cfg.steps] == pytest.approx(a, rel=1e-6)
    for m in ("avg", "last", "transfer"):
        assert scalars[f"metrics/{m}"][2 * cfg.steps] == pytest.approx(metrics[m], rel=1e-6)
    assert "acc_matrix" in acc.Tags()["images"]


def _wandb_history(run_file):
    """The history rows of an offline W&B run file (.wandb: LevelDB log format of wandb Record protobufs)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    block, pos, records, buf = 32768, 7, [], b""          # 7: the file header ':W&B' + magic + version
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                                     # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            records.append(buf + chunk)
    rows = []
    for raw in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_offline_scalars_equal_log_jsonl(tmp_path, init_ckpt, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = cfg_for(tmp_path, init_ckpt, report_to="wandb", name="wandb-test")
    metrics = ContinualTrainer(cfg).run()
    out = tmp_path / "run"
    files = list((out / "wandb").glob("offline-run-*/*.wandb"))
    assert len(files) == 1, files
    import time

    for _ in range(50):                 # wandb-core may still be writing the file after finish() returns
        by_step = {}
        for row in _wandb_history(files[0]):
            by_step.setdefault(row["_step"], {}).update(row)
        if sorted(by_step) == [0, 2, 4, 6, 8] and "acc_matrix/_type" in by_step[8]:
            break
        time.sleep(0.2)
    assert sorted(by_step) == [0, 2, 4, 6, 8]
    n_checked = 0
    for rec in _log_records(out):
        row = by_step[rec["task_index"] * cfg.steps + rec["step"]]
        for key, v in rec.items():
            if key in ("task", "task_index", "step", "time") or v is None:
                continue
            assert row[f"train/{key}"] == pytest.approx(v, rel=1e-9), key
            n_checked += 1
    assert n_checked >= 20
    with open(out / "state.json") as fh:
        state = json.load(fh)
    for t, acc_row in enumerate([state["zero_shot"]] + state["acc"]):
        for name, a in zip(state["tasks"], acc_row):
            assert by_step[t * cfg.steps][f"eval/{name}"] == pytest.approx(a)
    assert by_step[2 * cfg.steps]["metrics/avg"] == pytest.approx(metrics["avg"])
    assert by_step[2 * cfg.steps]["acc_matrix/_type"] == "image-file"


def test_wandb_missing_is_a_clear_error(tmp_path, init_ckpt, monkeypatch):
    from click.testing import CliRunner

    from gift_fast.cli.main import main

    monkeypatch.setitem(sys.modules, "wandb", None)          # as where wandb is not installed
    with pytest.raises(ValueError, match=r"--report-to wandb needs the wandb package: pip install 'gift-fast\[wandb\]'"):
        ContinualTrainer(cfg_for(tmp_path, init_ckpt, report_to="wandb"))
    r = CliRunner().invoke(main, ["train", "--preset", "tiny", "--report-to", "wandb", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "needs the wandb package" in r.output and not (tmp_path / "x").exists()


def test_only_rank_0_writes(tmp_path, init_ckpt):
    pytest.importorskip("tensorboard")
    trainer = ContinualTrainer(cfg_for(tmp_path, init_ckpt, report_to="tensorboard"))
    trainer.hooks.main = False            # as on rank 1: the hooks open no writer and write nothing
    trainer.hooks.on_log({"task": "ToyShapes", "task_index": 0, "step": 2, "loss_ce": 1.0})
    trainer.hooks.on_eval(-1, [1.0, 2.0])
    assert trainer.hooks.writers == [] and not (tmp_path / "run" / "tensorboard").exists()


# ----------------------------------------------------------------------------- --track
def test_track_curves_at_interval_and_same_numbers(tmp_path, init_ckpt):
    """Points before each task and after every K-th step; the tracked run's accuracy matrix is the
    untracked run's (the tracked evaluations change nothing)."""
    ContinualTrainer(cfg_for(tmp_path, init_ckpt, folder="plain")).run()
    cfg = cfg_for(tmp_path, init_ckpt, folder="tracked", track=["ToyColours"], track_every=2)
    ContinualTrainer(cfg).run()
    assert (tmp_path / "tracked" / "acc_matrix.csv").read_text() == (tmp_path / "plain" / "acc_matrix.csv").read_text()
    pts = read_curves(tmp_path / "tracked")
    assert [(p["task_index"], p["step"]) for p in pts] == [(0, 0), (0, 2), (0, 4), (1, 0), (1, 2), (1, 4)]
    assert [p["global_step"] for p in pts] == [0, 2, 4, 4, 6, 8]
    for p in pts:
        assert p["distill_ce"] > 0 and 0 <= p["test_acc/ToyColours"] <= 100 and p["test_loss/ToyColours"] > 0
        assert ("train_loss" in p) == (p["step"] > 0)
    # the last point of a task is measured on the model that is then evaluated: same accuracy
    with open(tmp_path / "tracked" / "state.json") as fh:
        state = json.load(fh)
    assert pts[2]["test_acc/ToyColours"] == pytest.approx(state["acc"][0][1])
    assert pts[0]["test_acc/ToyColours"] == pytest.approx(state["zero_shot"][1])
    # report --curves draws them
    png = plot_curves([("gift", tmp_path / "tracked")], tmp_path / "curves.png")
    assert png.stat().st_size > 10_000


def test_track_errors(tmp_path, init_ckpt):
    with pytest.raises(ValueError, match="--track MNIST: not a task of this run"):
        ContinualTrainer(cfg_for(tmp_path, init_ckpt, track=["MNIST"]))
    with pytest.raises(ValueError, match="no curves in"):
        plot_curves([("x", tmp_path)], tmp_path / "c.png")


def test_track_hook_only_at_requested_steps(tmp_path, init_ckpt, monkeypatch):
    """Untracked steps never enter the tracking code (which is where the host reads values back)."""
    from gift_fast import tracking

    calls = []
    monkeypatch.setattr(tracking.RunHooks, "on_track", lambda self, t, k, out, syn: calls.append((t, k)))
    cfg = cfg_for(tmp_path, init_ckpt, steps=7, track_every=3, log_every=100)
    ContinualTrainer(cfg).run()
    assert calls == [(0, 2), (0, 5), (1, 2), (1, 5)]


def test_no_host_sync_added_to_untracked_steps(tmp_path, init_ckpt, monkeypatch):
    """Count the host reads (item / float / tolist / bool of a tensor) at each step of a task, with and
    without --track: they differ only at the tracked steps."""
    import gift_fast.train as train_mod

    def run(name, **kw):
        counts = {}
        state = {"k": -1}
        orig_next = train_mod.TaskBatches.__next__

        def counting_next(self):
            state["k"] += 1
            return orig_next(self)

        def wrap(fn):
            def inner(self, *a, **k):
                counts[state["k"]] = counts.get(state["k"], 0) + 1
                return fn(self, *a, **k)
            return inner

        with monkeypatch.context() as m:
            m.setattr(train_mod.TaskBatches, "__next__", counting_next)
            for attr in ("item", "tolist", "__float__", "__bool__", "__int__"):
                m.setattr(torch.Tensor, attr, wrap(getattr(torch.Tensor, attr)))
            trainer = ContinualTrainer(cfg_for(tmp_path, init_ckpt, folder=name, steps=6, log_every=100, **kw))
            trainer.train_task(0)
        return counts

    plain = run("a")
    tracked = run("b", track=["ToyShapes"], track_every=3)
    untracked_steps = [k for k in range(6) if (k + 1) % 3 != 0 and k != 5]   # k = 5: the last step logs
    for k in untracked_steps:
        assert tracked.get(k, 0) == plain.get(k, 0), (k, plain, tracked)
    assert tracked.get(2, 0) > plain.get(2, 0)                # the tracked step does read values back


@pytest.mark.slow
def test_cli_tiny_preset_with_tracking_and_report_curves(tmp_path):
    """The command line end to end: train --report-to tensorboard --track on the (shortened) tiny preset,
    then report --curves draws curves.png and the report says the paper has no row for this protocol."""
    pytest.importorskip("tensorboard")
    from click.testing import CliRunner

    from gift_fast.cli.main import main

    out = tmp_path / "tiny"
    r = CliRunner().invoke(main, [
        "train", "--preset", "tiny", "--method", "gift", "--seeds", "0", "--tasks", "ToyShapes,ToyDigits",
        "--steps", "4", "--warmup", "2", "--batch-size", "16", "--syn-batch-size", "16", "--images-per-task", "32",
        "--log-every", "2", "--no-plots", "--quiet", "--out", str(out), "--report-to", "tensorboard",
        "--name", "cli-run", "--track", "ToyDigits", "--track-every", "2"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "No published row" in r.output
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["report_to"], cfg["name"], cfg["track"], cfg["track_every"]) == ("tensorboard", "cli-run",
                                                                                 ["ToyDigits"], 2)
    assert [p["step"] for p in read_curves(out)] == [0, 2, 4] * 2
    _, scalars = _tb_scalars(out / "tensorboard")
    assert sorted(scalars["curves/test_acc/ToyDigits"]) == [0, 2, 4, 6, 8]   # task 1's step 4 = task 2's step 0
    r = CliRunner().invoke(main, ["report", str(out), "--curves"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (out / "curves.png").stat().st_size > 10_000
    r = CliRunner().invoke(main, ["train", "--preset", "tiny", "--report-to", "mlflow", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "--report-to 'mlflow'" in r.output


def test_trim_log_drops_what_a_killed_attempt_wrote_after_the_resume_point(tmp_path):
    """One rule for log.jsonl and curves.jsonl (run_folder.trim_log): a resume at step k of task t keeps the
    earlier tasks and task t's records up to step k (its step-0 curve point too); starting task t over (k = 0)
    drops all of task t; a line cut by the kill goes."""
    from gift_fast.run_folder import trim_log

    recs = [{"task_index": 0, "step": 0}, {"task_index": 0, "step": 4}, {"task_index": 1, "step": 0},
            {"task_index": 1, "step": 2}, {"task_index": 1, "step": 4}, {"task_index": 1, "step": 6},
            {"task_index": 2, "step": 0}]
    path = tmp_path / "curves.jsonl"

    def kept(t, k):
        path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"task_index": 1, "st')
        trim_log(path, t, k)
        return [(r["task_index"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]

    assert kept(1, 4) == [(0, 0), (0, 4), (1, 0), (1, 2), (1, 4)]
    assert kept(1, 0) == [(0, 0), (0, 4)]
    trim_log(tmp_path / "absent.jsonl", 1, 4)          # nothing to trim: no file is made
    assert not (tmp_path / "absent.jsonl").exists()

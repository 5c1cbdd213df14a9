"""Resume inside a task: a run killed (SIGKILL) mid-task and resumed with --resume ends with the
same metrics and the same final weights as an uninterrupted run (tiny toy configuration, CPU)."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kill_hook import KILL_AT_STEP

torch = pytest.importorskip("torch")

# The driver runs one configuration; with KILL_AT > 0 it SIGKILLs itself when the KILL_AT-th
# training step of this process is about to run.
DRIVER = KILL_AT_STEP + textwrap.dedent("""
    import json, sys
    from gift_fast.train import TrainConfig, train

    cfg, kill_at = json.loads(sys.argv[1]), int(sys.argv[2])
    if kill_at > 0:
        kill_at_step(kill_at)
    train(TrainConfig(**cfg))
""")

STEPS = 12


def tiny_config(out: Path, resume: bool = False) -> dict:
    import dataclasses

    from gift_fast.toy import DEFAULT_TOY_ORDER
    from gift_fast.train import preset_config

    cfg = preset_config("tiny", out=str(out), tasks=list(DEFAULT_TOY_ORDER[:2]), steps=STEPS, warmup=2,
                        batch_size=16, syn_batch_size=16, images_per_task=48, toy_train_size=200,
                        toy_test_size=100, log_every=5, checkpoint_every=5, plots=False, progress=False,
                        resume=resume)
    return dataclasses.asdict(cfg)


def start(driver: Path, out: Path, kill_at: int = 0, resume: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(driver), json.dumps(tiny_config(out, resume)), str(kill_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple:
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def test_killed_mid_task_and_resumed_matches_uninterrupted(tmp_path):
    from gift_fast.toy import pretrained_toy_clip_path
    from gift_fast.checkpoints import read_state_dict

    pretrained_toy_clip_path("toy-vit", progress=False)     # both processes find it cached
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = start(driver, ref_dir)
    # first kill: task 1, before its step 8 (the in-task checkpoint of step 5 exists)
    rc, log = finish(start(driver, run_dir, kill_at=8))
    assert rc == -signal.SIGKILL, log
    ptr = json.loads((run_dir / "checkpoints" / "in_task.json").read_text())
    assert (ptr["task_index"], ptr["step"]) == (0, 5)
    assert not (run_dir / "metrics.json").exists()
    # second kill, in the resumed process: it finishes task 1 (7 steps), then dies before step 7 of task 2
    rc, log = finish(start(driver, run_dir, kill_at=STEPS - 5 + 7, resume=True))
    assert rc == -signal.SIGKILL, log
    ptr = json.loads((run_dir / "checkpoints" / "in_task.json").read_text())
    assert (ptr["task_index"], ptr["step"]) == (1, 5)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["finished"] == 1
    rc, log = finish(start(driver, run_dir, resume=True))
    assert rc == 0, log
    rc, ref_log = finish(ref)
    assert rc == 0, ref_log

    m_ref = json.loads((ref_dir / "metrics.json").read_text())
    m_run = json.loads((run_dir / "metrics.json").read_text())
    for key in ("transfer", "avg", "last"):
        assert m_run[key] == pytest.approx(m_ref[key], abs=1e-9), (key, m_run, m_ref)
    acc_ref = json.loads((ref_dir / "state.json").read_text())["acc"]
    acc_run = json.loads((run_dir / "state.json").read_text())["acc"]
    assert len(acc_run) == len(acc_ref) == 2
    for row_run, row_ref in zip(acc_run, acc_ref):
        assert row_run == pytest.approx(row_ref, abs=1e-9)
    last = sorted((ref_dir / "checkpoints").glob("task_02_*.safetensors"))[-1].name
    w_ref, w_run = read_state_dict(ref_dir / "checkpoints" / last), read_state_dict(run_dir / "checkpoints" / last)
    assert w_ref.keys() == w_run.keys()
    worst = max(float((w_ref[k].double() - w_run[k].double()).abs().max()) for k in w_ref)
    assert worst <= 1e-6, f"final weights differ by up to {worst}"
    # the in-task checkpoint is gone once its task is finished; the log has each record once, and (log_every
    # divides checkpoint_every, so the averaging windows line up) with the same losses
    assert not list((run_dir / "checkpoints").glob("in_task*"))
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    ref_recs = [json.loads(line) for line in (ref_dir / "log.jsonl").read_text().splitlines()]
    assert [(r["task_index"], r["step"]) for r in recs] == [(r["task_index"], r["step"]) for r in ref_recs]
    for r, q in zip(recs, ref_recs):
        for name in ("loss_ce", "loss_kd", "loss_awc"):
            assert r[name] == pytest.approx(q[name], rel=1e-6, abs=1e-9), (name, r, q)
    # against the schedule's formula, not only the other run: the lr after each logged step s of a task
    # (1e-3, 2 warm-up steps, then a cosine over the other STEPS - 2), 0 after the last
    for r in recs:
        s = r["step"]
        want = 1e-3 * ((s + 1) / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / (STEPS - 2))))
        assert r["lr"] == pytest.approx(want, rel=1e-9, abs=1e-15), r
    assert [abs(r["lr"]) < 1e-15 for r in recs if r["step"] == STEPS] == [True, True]
    # and the losses are the training's: the task loss falls over each task
    for t in range(2):
        ce = [r["loss_ce"] for r in recs if r["task_index"] == t]
        assert ce[-1] < ce[0], ce


def test_resume_refuses_an_in_task_checkpoint_past_the_task_length(tmp_path):
    """A damaged or foreign pointer (a step beyond the task's length) is a clear error, not a silent restart."""
    from gift_fast.train import TrainConfig, train

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "in_task.json").write_text(json.dumps(
        {"task_index": 0, "task": "ToyDigits", "step": STEPS + 3, "stem": "in_task_01_step000015"}))
    cfg = TrainConfig(**tiny_config(run_dir, resume=True))
    threads = torch.get_num_threads()           # the preset sets 1 thread for the process
    try:
        with pytest.raises(ValueError, match="in-task checkpoint is at step"):
            train(cfg)
    finally:
        torch.set_num_threads(threads)

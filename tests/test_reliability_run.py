"""The run folder is the run's alone (gift_fast.run_folder): what a resume reads is confined, verified and
locked; a new run never replaces a user's files; a run that failed before its first task restarts; the data a
run trained on is recorded and compared on resume; NaN weights stop the run.

Tiny runs: the toy world with the smallest tiny CLIP (random weights), CPU, one thread. The resume cases
start from one real run killed (SIGKILL) in its second task, after an in-task checkpoint (tests/kill_hook.py),
each case damaging its own copy of that folder."""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kill_hook import KILL_AT_STEP

torch = pytest.importorskip("torch")

STEPS = 6
TASKS = ["ToyShapes", "ToyColours"]

DRIVER = KILL_AT_STEP + textwrap.dedent("""
    import json, sys, time
    from gift_fast import step as _step_mod
    from gift_fast.train import TrainConfig, train


    def pause_at_step(n):
        original, calls = _step_mod.GiftStep.__call__, [0]

        def pausing(self, *a, **kw):
            calls[0] += 1
            if calls[0] == n:
                print("PAUSED", flush=True)
                time.sleep(120)
            return original(self, *a, **kw)

        _step_mod.GiftStep.__call__ = pausing


    cfg, kill_at, pause_at = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    if kill_at > 0:
        kill_at_step(kill_at)
    if pause_at > 0:
        pause_at_step(pause_at)
    train(TrainConfig(**cfg))
""")


def tiny(out, **kw):
    from gift_fast.train import preset_config

    base = dict(out=str(out), model="toy-vit-test", pretrained=None, tasks=list(TASKS), steps=STEPS, warmup=1,
                batch_size=8, syn_batch_size=8, images_per_task=16, toy_train_size=48, toy_test_size=24,
                eval_batch_size=64, log_every=3, checkpoint_every=3, plots=False, progress=False, kernels="torch")
    base.update(kw)
    return preset_config("tiny", **base)


def run_driver(tmp_path, cfg, kill_at=0, pause_at=0, wait=True):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(driver), json.dumps(dataclasses.asdict(cfg)), str(kill_at),
                             str(pause_at)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def train_here(cfg):
    from gift_fast.train import train

    threads = torch.get_num_threads()       # the preset sets one thread for the process
    try:
        return train(cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A run killed before step 5 of task 2: task 1 finished (checkpoint + state), in-task pair of step 3."""
    tmp = tmp_path_factory.mktemp("killed")
    run = tmp / "run"
    rc, log = run_driver(tmp, tiny(run), kill_at=STEPS + 5)
    assert rc == -signal.SIGKILL, log
    ptr = json.loads((run / "checkpoints" / "in_task.json").read_text())
    assert (ptr["task_index"], ptr["step"]) == (1, 3)
    return run


def copy_of(killed_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(killed_run, run)
    return run


def resume(run, **kw):
    return train_here(tiny(run, resume=True, **kw))


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def flip_a_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- pointer and files
def test_pointer_step_that_disagrees_with_its_files_is_refused(killed_run, tmp_path):
    run = copy_of(killed_run, tmp_path)
    edit_json(run / "checkpoints" / "in_task.json", lambda p: p.update(step=5))
    with pytest.raises(ValueError, match=r"in_task\.json says task 2 step 5"):
        resume(run)


def test_pointer_and_renamed_files_that_disagree_with_their_content_are_refused(killed_run, tmp_path):
    """Pointer and file names say step 5, the files hold step 3: the files' own task/step decide."""
    from gift_fast.run_folder import sha256_file

    run = copy_of(killed_run, tmp_path)
    ck = run / "checkpoints"
    for ext in (".safetensors", ".pt"):
        (ck / f"in_task_02_step000003{ext}").rename(ck / f"in_task_02_step000005{ext}")
    edit_json(ck / "in_task.json", lambda p: p.update(
        step=5, stem="in_task_02_step000005",
        sha256={e: sha256_file(ck / f"in_task_02_step000005{e}") for e in (".safetensors", ".pt")}))
    with pytest.raises(ValueError, match=r"holds task 2 step 3"):
        resume(run)


@pytest.mark.parametrize("damage", ["no stem", "step null"])
def test_pointer_without_stem_or_step_is_a_sentence_naming_it(killed_run, tmp_path, damage):
    run = copy_of(killed_run, tmp_path)
    edit_json(run / "checkpoints" / "in_task.json",
              (lambda p: p.pop("stem")) if damage == "no stem" else (lambda p: p.update(step=None)))
    with pytest.raises(ValueError, match=r"in_task\.json: '(stem|step)' is None"):
        resume(run)


def test_bit_flip_in_an_in_task_checkpoint_is_refused(killed_run, tmp_path):
    run = copy_of(killed_run, tmp_path)
    flip_a_byte(run / "checkpoints" / "in_task_02_step000003.safetensors")
    with pytest.raises(ValueError, match=r"in_task_02_step000003\.safetensors does not match the checksum"):
        resume(run)


def test_bit_flip_in_a_task_checkpoint_is_refused(killed_run, tmp_path):
    run = copy_of(killed_run, tmp_path)
    flip_a_byte(run / "checkpoints" / "task_01_ToyShapes.safetensors")
    with pytest.raises(ValueError, match=r"task_01_ToyShapes\.safetensors does not match the checksum"):
        resume(run)


def test_a_run_from_before_checksums_resumes_with_a_warning(killed_run, tmp_path):
    run = copy_of(killed_run, tmp_path)
    edit_json(run / "state.json", lambda s: s.pop("checksums"))
    edit_json(run / "checkpoints" / "in_task.json", lambda p: p.pop("sha256"))
    with pytest.warns(RuntimeWarning, match="records no checksums"):
        metrics = resume(run)
    assert metrics is not None and len(json.loads((run / "state.json").read_text())["acc"]) == 2


def test_eval_refuses_a_damaged_run_checkpoint(killed_run, tmp_path):
    from click.testing import CliRunner

    from gift_fast.cli.main import main

    run = copy_of(killed_run, tmp_path)
    ck = run / "checkpoints" / "task_01_ToyShapes.safetensors"
    flip_a_byte(ck)
    res = CliRunner().invoke(main, ["eval", "--preset", "tiny", "--model", "toy-vit-test", "--pretrained", str(ck),
                                    "--tasks", "ToyShapes", "--quiet"])
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output
    assert "does not match the checksum" in res.output and str(ck) in res.output


# ----------------------------------------------------------------------------- nothing leaves the folder
def test_state_paths_outside_the_folder_are_neither_loaded_nor_deleted(killed_run, tmp_path):
    run = copy_of(killed_run, tmp_path)
    victim = tmp_path / "victim.safetensors"
    shutil.copy(run / "checkpoints" / "task_01_ToyShapes.safetensors", victim)
    shutil.rmtree(run / "checkpoints")          # resume from the task boundary: the state's checkpoint only
    for rel in ("../victim.safetensors", str(victim)):
        edit_json(run / "state.json", lambda s: s.update(checkpoints=[rel]))
        with pytest.raises(ValueError, match="outside the run folder"):
            resume(run, keep_checkpoints="last")
        assert victim.is_file()


def test_in_task_stem_leading_out_is_refused(killed_run, tmp_path):
    run = copy_of(killed_run, tmp_path)
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"user data")
    edit_json(run / "checkpoints" / "in_task.json", lambda p: p.update(stem="../../victim"))
    with pytest.raises(ValueError, match="not an in-task checkpoint of this folder"):
        resume(run)
    assert victim.read_bytes() == b"user data"


def test_on_the_fly_synthesis_never_touches_a_folder_it_did_not_make(killed_run, tmp_path):
    from gift_fast.run_folder import SYNTHETIC_MARKER

    run = copy_of(killed_run, tmp_path)
    folder = run / "synthetic" / "ToyColours_Syn"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "mine.txt").write_text("a user's file")
    assert not (folder / SYNTHETIC_MARKER).exists()
    with pytest.raises(ValueError, match="was not made by this run's on-the-fly synthesis"):
        resume(run)
    assert (folder / "mine.txt").read_text() == "a user's file"


# ----------------------------------------------------------------------------- one process at a time
def test_a_second_process_resuming_the_same_run_refuses(killed_run, tmp_path):
    run = copy_of(killed_run, tmp_path)
    first = run_driver(tmp_path, tiny(run, resume=True), pause_at=1, wait=False)
    try:
        line = first.stdout.readline()
        while line and "PAUSED" not in line:
            line = first.stdout.readline()
        assert "PAUSED" in line, "the first process did not reach its first step"
        with pytest.raises(ValueError, match="in use by another gift-fast process"):
            resume(run)
    finally:
        first.kill()
        first.communicate(timeout=60)


# ----------------------------------------------------------------------------- a user's folder
def test_new_run_refuses_a_folder_of_user_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "acc_matrix.csv").write_text("my table")
    with pytest.raises(ValueError, match="not a gift-fast run folder.*--force"):
        train_here(tiny(out, tasks=TASKS[:1], steps=2))
    assert (out / "notes.txt").read_text() == "keep me" and (out / "acc_matrix.csv").read_text() == "my table"
    assert sorted(p.name for p in out.iterdir()) == ["acc_matrix.csv", "notes.txt"]
    # --force still refuses to replace a file of the run's names
    with pytest.raises(ValueError, match="already holds acc_matrix.csv"):
        train_here(tiny(out, tasks=TASKS[:1], steps=2, force=True))
    assert (out / "acc_matrix.csv").read_text() == "my table"


def test_force_adds_the_run_and_keeps_other_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    train_here(tiny(out, tasks=TASKS[:1], steps=2, force=True, checkpoint_every=0))
    assert (out / "notes.txt").read_text() == "keep me" and (out / "metrics.json").is_file()


def test_force_refuses_a_users_synthetic_folder(tmp_path):
    out = tmp_path / "mine"
    (out / "synthetic" / "ToyShapes_Syn").mkdir(parents=True)
    (out / "synthetic" / "ToyShapes_Syn" / "mine.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="already holds synthetic"):
        train_here(tiny(out, tasks=TASKS[:1], steps=2, force=True))
    assert (out / "synthetic" / "ToyShapes_Syn" / "mine.png").read_bytes() == b"x"


# ----------------------------------------------------------------------------- failed starts
def test_a_failure_before_any_work_leaves_no_folder(tmp_path):
    out = tmp_path / "run"
    with pytest.raises((ValueError, OSError)):
        train_here(tiny(out, tasks=TASKS[:1], generator="sd", sd_model=str(tmp_path / "no-such-pipeline")))
    assert not out.exists()


def test_a_run_killed_before_its_first_task_restarts_with_a_corrected_command(tmp_path):
    out = tmp_path / "run"
    rc, log = run_driver(tmp_path, tiny(out, tasks=TASKS[:1], steps=2), kill_at=1)
    assert rc == -signal.SIGKILL, log
    assert (out / "state.json").is_file()
    metrics = train_here(tiny(out, tasks=TASKS[:1], steps=2, lr=5e-4, checkpoint_every=0))   # other options
    assert metrics is not None and (out / "metrics.json").is_file()
    assert json.loads((out / "config.json").read_text())["config"]["lr"] == 5e-4


# ----------------------------------------------------------------------------- non-finite weights
def test_nan_weights_after_the_last_step_stop_the_run(tmp_path, monkeypatch):
    from gift_fast import step as step_mod

    original = step_mod.GiftStep.__call__
    calls = [0]

    def poisoning(self, *a, **kw):
        out = original(self, *a, **kw)
        calls[0] += 1
        if calls[0] == 2:                # the task's last step
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(step_mod.GiftStep, "__call__", poisoning)
    with pytest.raises(FloatingPointError, match="non-finite weights in task 1 .* after step 2.*--lr"):
        train_here(tiny(tmp_path / "run", tasks=TASKS[:1], steps=2, log_every=50, checkpoint_every=0,
                        method="finetune"))
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_eval_refuses_non_finite_weights(tmp_path):
    from click.testing import CliRunner

    from gift_fast.cli.main import main
    from gift_fast.checkpoints import save_model
    from gift_fast.toy.clip import build_tiny_clip

    model = build_tiny_clip("toy-vit-test")
    with torch.no_grad():
        model.visual.conv1.weight[0, 0, 0, 0] = float("inf")
    path = save_model(model, tmp_path / "diverged.safetensors")
    res = CliRunner().invoke(main, ["eval", "--preset", "tiny", "--model", "toy-vit-test", "--pretrained", str(path),
                                    "--tasks", "ToyShapes", "--quiet"])
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output
    assert "non-finite weights" in res.output and "diverged.safetensors" in res.output


# ----------------------------------------------------------------------------- changed inputs
def _synthetic_folder(root: Path, task: str, n: int = 16):
    import numpy as np
    from PIL import Image

    folder = root / f"{task}_Syn"
    folder.mkdir(parents=True)
    lines = ["image,text"]
    for i in range(n):
        arr = np.random.default_rng(i).integers(1, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.png")
        lines.append(f"{i}.png,a photo of a thing {i % 4}.")
    (folder / "image_text.csv").write_text("\n".join(lines) + "\n")
    (folder / "manifest.json").write_text(json.dumps({"complete": True, "pool_tasks": []}))   # the first task


def test_resume_refuses_a_changed_synthetic_folder(tmp_path):
    syn = tmp_path / "syn"
    _synthetic_folder(syn, "ToyShapes")
    run = tmp_path / "run"
    cfg = tiny(run, tasks=TASKS[:1], steps=2, synth=str(syn), checkpoint_every=0)
    train_here(cfg)
    csv = syn / "ToyShapes_Syn" / "image_text.csv"
    csv.write_text(csv.read_text().replace("thing 3", "other thing"))
    with pytest.raises(ValueError, match=r"synthetic data changed.*ToyShapes_Syn/image_text\.csv"):
        train_here(dataclasses.replace(cfg, resume=True))


def test_resume_refuses_changed_reference_images(tmp_path):
    import numpy as np
    from PIL import Image

    ref = tmp_path / "ref"
    for c, cls in enumerate(("red_circle", "blue_square")):
        (ref / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((32, 32, 3), 40 * c + i, np.uint8)).save(ref / cls / f"{i}.png")
    run = tmp_path / "run"
    cfg = tiny(run, tasks=TASKS[:1], steps=2, reference_images=str(ref), images_per_task=8, checkpoint_every=0)
    train_here(cfg)
    assert "--reference-images" in json.loads((run / "state.json").read_text())["synthetic_fingerprints"]
    train_here(dataclasses.replace(cfg, resume=True))          # unchanged: the finished run resumes (nothing to do)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(ref / "red_circle" / "3.png")   # another image, same name
    with pytest.raises(ValueError, match=r"reference images under .*ref changed since the run started"):
        train_here(dataclasses.replace(cfg, resume=True))


def test_resume_refuses_changed_mtil_data(tmp_path):
    from fake_datasets import make_fake_mtil_root, relaxed_md5_checks
    from gift_fast.train import TrainConfig

    root = tmp_path / "data"
    make_fake_mtil_root(str(root), tasks=["EuroSAT"])
    cfg = TrainConfig(out=str(tmp_path / "run"), model="toy-vit-test", pretrained=None, tasks=["EuroSAT"],
                      data_root=str(root), data_cache=None, method="finetune", steps=1, batch_size=4, warmup=1,
                      device="cpu", progress=False, num_workers=0, plots=False)
    with relaxed_md5_checks():
        train_here(cfg)
        assert (tmp_path / "run" / "EuroSAT-split.json").is_file()
        folder = next((root / "eurosat" / "2750").iterdir())
        shutil.copy(next(folder.iterdir()), folder / "zz_added.jpg")      # a new file moves the seeded split
        with pytest.raises(ValueError, match="seeded split differs from the one recorded"):
            train_here(dataclasses.replace(cfg, resume=True))


# ----------------------------------------------------------------------------- unit rules
def test_paths_are_resolved_inside_the_folder(tmp_path):
    from gift_fast.run_folder import RunFolderError, inside

    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "link").symlink_to(tmp_path)
    assert inside(root, "checkpoints/a.safetensors", root / "state.json") == root / "checkpoints" / "a.safetensors"
    for bad in ("/etc/passwd", "../x", "checkpoints/../../x", "checkpoints/link/x", "", None):
        with pytest.raises(RunFolderError):
            inside(root, bad, root / "state.json")

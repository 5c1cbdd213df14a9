"""One error path for the CLI: a bad value, a bad file, a full disk or an unwritable output is one sentence
naming the option or the file (exit status 1, no traceback), checked before any work so that no folder is
left behind; a --jobs worker's error reaches the parent the same way."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from gift_fast.cli.main import main

TINY = ["train", "--preset", "tiny", "--model", "toy-vit-test", "--pretrained", "none", "--tasks", "ToyShapes",
        "--steps", "2", "--seeds", "0", "--method", "finetune", "--quiet", "--no-plots"]


def invoke(args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    # handled by the CLI: click's SystemExit; an unhandled exception would be the exception itself
    assert isinstance(res.exception, SystemExit), (res.exception, res.output)
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output and "Aborted!" not in res.output, res.output
    return res.output


@pytest.mark.parametrize("args, option", [
    (["--log-every", "0"], "--log-every"),
    (["--eval-batch-size", "0"], "--eval-batch-size"),
    (["--threads", "-2"], "--threads"),
    (["--threads", "0"], "--threads"),
    (["--device", "tpu"], "--device"),
    (["--model", "ViT-B-16"], "--model ViT-B-16"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--temperature", "0"], "--temperature"),
    (["--label-smoothing", "1.5"], "--label-smoothing"),
    (["--jobs", "0"], "--jobs"),
    (["--num-workers", "-1"], "--num-workers"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"),
    (["--warmup", "-5"], "--warmup"),
    (["--ita-weight", "-1"], "--ita-weight"),
    (["--seeds", ","], "--seeds"),
    (["--order", "2"], "--order"),              # with the --tasks of TINY
])
def test_bad_train_options_fail_before_work_and_leave_no_folder(tmp_path, args, option):
    out = tmp_path / "run"
    base = list(TINY)
    if args[0] == "--seeds":
        i = base.index("--seeds")
        del base[i:i + 2]
    msg = invoke(base + args + ["--out", out])
    assert option in msg
    assert not out.exists()


def test_synth_guidance_nan_is_refused(tmp_path):
    out = tmp_path / "syn"
    msg = invoke(["synth", "--preset", "tiny", "--guidance", "nan", "--out", out])
    assert "--guidance" in msg and not out.exists()


def test_train_into_a_folder_of_user_files_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my report")
    msg = invoke(TINY + ["--out", out])
    assert str(out) in msg and "--force" in msg
    assert (out / "report.md").read_text() == "my report"
    assert [p.name for p in out.iterdir()] == ["report.md"]


# ----------------------------------------------------------------------------- bad files
def _files(tmp_path):
    import torch

    from gift_fast.checkpoints import save_model
    from gift_fast.toy.clip import build_tiny_clip

    good = save_model(build_tiny_clip("toy-vit-test"), tmp_path / "good.safetensors")
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00garbage" * 50)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle at all" * 10)
    torch.save({"x": torch.zeros(3)}, tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[: len(whole) // 2])


@pytest.mark.parametrize("name", ["truncated.safetensors", "garbage.safetensors", "empty.pt", "garbage.pt",
                                  "truncated.pt"])
def test_bad_checkpoint_files_are_one_sentence_naming_the_file(tmp_path, name):
    _files(tmp_path)
    msg = invoke(["eval", "--preset", "tiny", "--model", "toy-vit-test", "--pretrained", tmp_path / name,
                  "--tasks", "ToyShapes", "--quiet"])
    assert name in msg
    assert "weights_only=False" not in msg


def test_unwritable_eval_out_fails_before_evaluating(tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    msg = invoke(["eval", "--preset", "tiny", "--model", "toy-vit-test", "--pretrained", "none", "--tasks",
                  "ToyShapes", "--quiet", "--out", folder])
    assert "--out" in msg and str(folder) in msg
    (tmp_path / "a-file").write_text("x")
    msg = invoke(["eval", "--preset", "tiny", "--model", "toy-vit-test", "--pretrained", "none", "--tasks",
                  "ToyShapes", "--quiet", "--out", tmp_path / "a-file" / "acc.json"])
    assert "a-file" in msg


def test_unwritable_report_output_is_a_sentence(tmp_path):
    csv = tmp_path / "acc_matrix.csv"
    csv.write_text("after,A,B\nzero-shot,10.0,20.0\nA,30.0,20.0\nB,25.0,40.0\n")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    msg = invoke(["report", csv, "-o", folder])
    assert str(folder) in msg


def test_empty_pt_is_not_read_as_ctrl_d(tmp_path):
    """Through the real entry point: click would print only "Aborted!" for an EOFError."""
    (tmp_path / "empty.pt").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "gift_fast.cli.main", "eval", "--preset", "tiny", "--model",
                           "toy-vit-test", "--pretrained", str(tmp_path / "empty.pt"), "--tasks", "ToyShapes",
                           "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "empty.pt" in proc.stderr and "Traceback" not in proc.stderr and "Aborted!" not in proc.stderr


# ----------------------------------------------------------------------------- full disk, workers
FULL_DISK = textwrap.dedent("""
    import errno, sys
    import safetensors.torch

    def no_space(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    safetensors.torch.save_file = no_space
    from gift_fast.cli.main import main
    sys.argv = ["gift-fast"] + sys.argv[1:]
    main()
""")


def test_full_disk_while_saving_names_the_file(tmp_path):
    driver = tmp_path / "full_disk.py"
    driver.write_text(FULL_DISK)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(driver)] + TINY + ["--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "cannot write" in proc.stderr and "task_01_ToyShapes.safetensors" in proc.stderr, proc.stderr
    assert "free disk space" in proc.stderr


FULL_DISK_LOG = textwrap.dedent("""
    import builtins, errno, sys

    real_open = builtins.open

    def open_without_space_for_logs(file, mode="r", *a, **kw):
        if str(file).endswith("log.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *a, **kw)

    builtins.open = open_without_space_for_logs
    from gift_fast.cli.main import main
    sys.argv = ["gift-fast"] + sys.argv[1:]
    main()
""")


def test_full_disk_while_appending_the_log_names_the_file(tmp_path):
    driver = tmp_path / "full_disk_log.py"
    driver.write_text(FULL_DISK_LOG)
    proc = subprocess.run([sys.executable, str(driver)] + TINY + ["--log-every", "1", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "cannot write" in proc.stderr and "log.jsonl" in proc.stderr and "free disk space" in proc.stderr, proc.stderr


def test_append_text_line_names_the_file_on_a_full_device():
    from gift_fast.files import append_text_line

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    with pytest.raises(OSError, match=r"cannot write /dev/full: .*free disk space"):
        append_text_line("/dev/full", "{}")


@pytest.mark.slow
def test_an_error_in_a_jobs_worker_reaches_the_parent_as_a_sentence(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle at all" * 10)
    args = [a if a != "none" else str(tmp_path / "garbage.pt") for a in TINY]
    i = args.index("--seeds")
    args[i + 1] = "0,1"
    proc = subprocess.run([sys.executable, "-m", "gift_fast.cli.main"] + args +
                          ["--jobs", "2", "--out", str(tmp_path / "runs")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert "garbage.pt" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("state.json"))


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    """A bug is not an expected failure: no sentence, the exception itself."""
    import gift_fast.runs as train_mod

    def bug(*a, **kw):
        raise KeyError("a bug")

    monkeypatch.setattr(train_mod, "run_many", bug)
    res = CliRunner().invoke(main, TINY + ["--out", str(tmp_path / "run")])
    assert isinstance(res.exception, KeyError)


def test_expected_error_classes_print_one_line():
    from gift_fast.cli.main import expected_errors

    kinds = expected_errors()
    for e in (OSError(28, "No space left on device"), ValueError("x"), EOFError(), FloatingPointError("nan")):
        assert isinstance(e, kinds)
    assert not isinstance(KeyError("k"), kinds) and not isinstance(TypeError("t"), kinds)
    json.dumps([k.__name__ for k in kinds])


def test_synth_with_a_missing_model_leaves_no_folder(tmp_path):
    out = tmp_path / "syn"
    res = CliRunner().invoke(main, ["synth", "--order", "1", "--model", str(tmp_path / "no-such-pipeline"),
                                    "--device", "cpu", "--out", str(out), "--quiet"])
    assert res.exit_code != 0, res.output
    assert not out.exists()

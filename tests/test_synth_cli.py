"""gift-fast synth: the tiny preset end to end, resume, and the error messages."""
import csv
import json

import pytest
from click.testing import CliRunner

from gift_fast.cli.main import main


def _invoke(*args):
    return CliRunner().invoke(main, ["synth", *args], catch_exceptions=False)


def test_tiny_preset_runs_and_resumes(tmp_path):
    out = tmp_path / "syn"
    r = _invoke("--preset", "tiny", "--out", str(out), "--images-per-task", "3", "--steps", "2", "--quiet",
                "--tasks", "ToyShapes,ToyVehicles")
    assert r.exit_code == 0, r.output
    assert "attention: sdpa" in r.output and "DPMSolverMultistepScheduler 2 steps" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["ToyShapes_Syn", "ToyVehicles_Syn", "manifest.json"]
    rows = list(csv.reader(open(out / "ToyVehicles_Syn" / "image_text.csv")))
    assert rows[0] == ["image", "text"] and [r_[0] for r_ in rows[1:]] == ["0.jpeg", "1.jpeg", "2.jpeg"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"] == "tiny-random (built in code)" and m["steps"] == 2 and m["guidance"] == 7.5
    assert m["scheduler"] == "DPMSolverMultistepScheduler" and m["seed"] == 42
    assert m["runtime"]["attention"] == "sdpa" and m["counts"]["images"] == 6
    assert m["tasks"]["ToyVehicles"]["pool_size"] == 1000 + 4 + 3  # ImageNet + the two earlier toy tasks
    (out / "ToyShapes_Syn" / "1.jpeg").unlink()
    r = _invoke("--preset", "tiny", "--out", str(out), "--images-per-task", "3", "--steps", "2", "--quiet",
                "--tasks", "ToyShapes,ToyVehicles")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "ToyShapes_Syn" / "manifest.json").read_text())
    assert m["last_run"]["generated"] == 1 and m["last_run"]["skipped_valid"] == 2
    r = CliRunner().invoke(main, ["synth", "--preset", "tiny", "--out", str(out), "--images-per-task", "3",
                                  "--steps", "3", "--quiet", "--tasks", "ToyShapes"])
    assert r.exit_code != 0 and "another configuration" in r.output and "--overwrite" in r.output


def test_task_file(tmp_path):
    tf = tmp_path / "tasks.json"
    tf.write_text(json.dumps({"tasks": [{"name": "Birds", "classnames": ["robin"]},
                                        {"name": "Trees", "classnames": ["oak", "elm"]}],
                              "base_classnames": ["thing"]}))
    out = tmp_path / "o"
    r = _invoke("--preset", "tiny", "--task-file", str(tf), "--out", str(out), "--images-per-task", "4",
                "--steps", "1", "--quiet", "--tasks", "Trees")
    assert r.exit_code == 0, r.output
    texts = [row[1] for row in list(csv.reader(open(out / "Trees_Syn" / "image_text.csv")))[1:]]
    assert set(texts) <= {"a photo of a thing.", "a photo of a robin."}


@pytest.mark.parametrize("args,msg", [
    (["--order", "3", "--preset", "tiny"], "unknown order 3"),
    (["--preset", "tiny", "--tasks", "Nope"], "unknown task(s) in --tasks: Nope"),
    (["--order", "1", "--tasks", "Aircraft,Birds"], "unknown task(s) in --tasks: Birds"),
    (["--order", "1", "--task-file", "x.json"], "not both"),
    (["--preset", "tiny", "--model", "x"], "drop --sd-model"),
    (["--preset", "tiny", "--sd-model", "x"], "drop --sd-model"),
    (["--preset", "tiny", "--batch-size", "0"], "--sd-batch-size must be >= 1"),
    (["--preset", "tiny", "--steps", "2", "--sd-steps", "3"], "--steps is the old spelling of --sd-steps"),
    (["--preset", "tiny", "--task-file", "/nonexistent/tasks.json"], "does not exist"),
    (["--order", "1", "--pool-exclude", "Birds"], "unknown data set(s) in --pool-exclude: Birds"),
    (["--order", "1", "--prompts-only", "--prompts-from", "x"], "give one"),
])
def test_clear_errors(args, msg):
    r = CliRunner().invoke(main, ["synth", *args])
    assert r.exit_code != 0
    assert msg in r.output, r.output


def test_model_folder_that_is_not_a_pipeline_and_unwritable_output(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "unet.safetensors").write_bytes(b"")
    r = CliRunner().invoke(main, ["synth", "--order", "1", "--model", str(folder), "--out", str(tmp_path / "o"),
                                  "--device", "cpu"])
    assert r.exit_code != 0 and "not a diffusers pipeline folder" in r.output, r.output
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = CliRunner().invoke(main, ["synth", "--preset", "tiny", "--out", str(blocker / "sub")])
    assert r.exit_code != 0 and "not writable" in r.output, r.output


def test_prompts_only_loads_no_model_and_records_the_pool(tmp_path):
    import sys
    out = tmp_path / "p"
    had_diffusers = "diffusers" in sys.modules
    r = _invoke("--order", "2", "--prompts-only", "--images-per-task", "50", "--out", str(out),
                "--pool-exclude", "StanfordCars", "--tasks", "StanfordCars,Food,MNIST")
    assert r.exit_code == 0, r.output
    assert "prompts only" in r.output
    assert had_diffusers or "diffusers" not in sys.modules        # no model code was imported
    m = json.loads((out / "manifest.json").read_text())
    assert m["prompts_only"] and m["pool"]["pool_exclude"] == ["StanfordCars"] and m["seed_scheme"] == "hash"
    assert m["order"][:3] == ["StanfordCars", "Food", "MNIST"] and m["generator"] is None
    texts = [row[1] for row in list(csv.reader(open(out / "MNIST_Syn" / "image_text.csv")))[1:]]
    assert len(texts) == 50 and not any("a type of car" in t for t in texts)
    tm = json.loads((out / "MNIST_Syn" / "manifest.json").read_text())
    assert tm["pool_tasks"] == ["Food"] and tm["pool_size"] == 1000 + 101 and tm["template"].startswith("a photo of")


def test_prompts_from_with_the_tiny_preset(tmp_path):
    src = tmp_path / "authors" / "ToyAnimals_Syn"
    src.mkdir(parents=True)
    (src / "image_text.csv").write_text("image,text\n./data/synthetic/synthetic_data_a/ToyAnimals_Syn/1.jpeg,"
                                        "a photo of a circle.\n./data/synthetic/synthetic_data_a/ToyAnimals_Syn/0.jpeg,"
                                        "a photo of a tench.\n")
    out = tmp_path / "o"
    r = _invoke("--preset", "tiny", "--tasks", "ToyAnimals", "--prompts-from", str(tmp_path / "authors"),
                "--seed-scheme", "authors", "--steps", "1", "--quiet", "--out", str(out))
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(open(out / "ToyAnimals_Syn" / "image_text.csv")))[1:]
    assert rows == [["0.jpeg", "a photo of a tench."], ["1.jpeg", "a photo of a circle."]]
    tm = json.loads((out / "ToyAnimals_Syn" / "manifest.json").read_text())
    assert tm["seed_scheme"] == "authors" and tm["images"] == 2

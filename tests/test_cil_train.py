"""Class-incremental runs end to end on fake data with the tiny CLIP: the one-pass evaluation against
per-step evaluation, the trainer (CE over the step's classes, per-benchmark label smoothing and weight
decay, metrics, report, resume checks) and the command line."""
import hashlib
import json

import pytest
import torch
from click.testing import CliRunner

from gift_fast.data import cil as dcil
from fake_datasets import make_fake_cifar100_root, make_fake_tiny_imagenet_root, relaxed_md5_checks
from gift_fast.metrics import cil_metrics


class HashTokenizer:
    """A distinct token sequence per text (the toy tokenizer maps CIFAR100's names to <unk>, so every class
    prompt would look the same and every class embedding be equal)."""

    def __init__(self, vocab: int, length: int = 16):
        self.vocab, self.length = vocab, length

    def __call__(self, texts):
        out = torch.zeros(len(texts), self.length, dtype=torch.long)
        for i, t in enumerate(texts):
            h = hashlib.sha256(t.encode()).digest()
            ids = [1] + [3 + b % (self.vocab - 4) for b in h[:6]] + [self.vocab - 1]   # eot = the largest id
            out[i, :len(ids)] = torch.tensor(ids)
        return out


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cil_train_data"))
    make_fake_cifar100_root(root, train_per_class=1, test_per_class=1)
    make_fake_tiny_imagenet_root(root, train_per_class=1, test_per_class=1)
    return root


@pytest.fixture(scope="module")
def bundle():
    import dataclasses

    from gift_fast.models import create_clip
    torch.manual_seed(0)
    b = create_clip("toy-vit", None, device="cpu")
    return dataclasses.replace(b, tokenizer=HashTokenizer(b.tokenizer.vocab_size))


def _cfg(out, root, **kw):
    from gift_fast.train import TrainConfig
    base = dict(out=str(out), model="toy-vit", pretrained=None, order=None, data_root=root, data_cache=None,
                method="gift", synth="on-the-fly", generator="toy", images_per_task=8, batch_size=8,
                syn_batch_size=8, device="cpu", num_workers=0, eval_batch_size=128, progress=False, plots=False,
                warmup=5, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_one_pass_evaluation_equals_per_step_evaluation(fake_root, bundle):
    from gift_fast.cil_trainer import cil_step_accuracies
    from gift_fast.evaluate import evaluate_tasks
    with relaxed_md5_checks():
        bench = dcil.build_cil("cifar100-cil", 5, fake_root, image_size=32, mean=bundle.mean, std=bundle.std,
                               progress=False)
    dev = torch.device("cpu")
    fast = cil_step_accuracies(bundle.model, bundle.tokenizer, bench, device=dev, batch_size=37)
    ref = evaluate_tasks(bundle.model, bundle.tokenizer, bench.eval_tasks, device=dev, batch_size=64, progress=False)
    assert fast == pytest.approx(ref, abs=1e-9)
    assert len(set(round(a, 6) for a in ref)) > 1          # not a degenerate case (all equal)


def test_cil_trainer_end_to_end_and_resume(fake_root, bundle, tmp_path):
    from gift_fast.cil_trainer import CILConfig, CILTrainer
    cfg = _cfg(tmp_path / "run", fake_root)
    with relaxed_md5_checks():
        tr = CILTrainer(cfg, CILConfig("cifar100-cil", 2, iterations=2), bundle=bundle)
    assert tr.cfg.label_smoothing == 0.2 and tr.weight_decay == 0.0 and tr.step_iterations == [2, 2]
    assert [len(t.classnames) for t in tr.tasks] == [50, 50]          # CE over the step's classes only
    m = tr.run()
    out = tmp_path / "run"
    state = json.load(open(out / "state.json"))
    diag = [state["acc"][t][t] for t in range(2)]
    assert m["step_accuracies"] == pytest.approx(diag)
    assert (m["avg"], m["last"]) == (pytest.approx(cil_metrics(diag)["avg"]), pytest.approx(diag[-1]))
    assert m["zero_shot"]["step_accuracies"] == pytest.approx(state["zero_shot"])
    assert json.load(open(out / "metrics.json"))["avg"] == pytest.approx(m["avg"])
    acc = json.load(open(out / "cil_accuracies.json"))
    assert acc["finished_steps"] == 2 and acc["seen_classes"] == [50, 100]
    assert "gift (measured)" in open(out / "cil_report.md").read()
    for f in ("cil-split.json", "synth-tasks.json", "cil.json", "log.jsonl"):
        assert (out / f).is_file(), f
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log if r["task_index"] == 1] == [1, 2]                 # 2 iterations a step
    # the synthetic pool of step 1 = the 100 base names + the classes of step 0
    syn = json.load(open(out / "synth-tasks.json"))
    assert syn["base_classnames"] == tr.bench.base_classnames and len(syn["base_classnames"]) == 100
    # resume: finished, same numbers, no training; other CIL settings are refused
    with relaxed_md5_checks():
        again = CILTrainer(_cfg(out, fake_root, resume=True), CILConfig("cifar100-cil", 2, iterations=2),
                           bundle=bundle).run()
        assert again["avg"] == pytest.approx(m["avg"])
        with pytest.raises(ValueError, match="class-incremental settings differ"):
            CILTrainer(_cfg(out, fake_root, resume=True), CILConfig("cifar100-cil", 2, iterations=3),
                       bundle=bundle).run()
        with pytest.raises(ValueError, match="differs from the one recorded"):
            CILTrainer(_cfg(out, fake_root, resume=True), CILConfig("cifar100-cil", 2, class_order="seed:5"),
                       bundle=bundle)


def test_tinyimagenet_settings_reach_the_optimizer(fake_root, bundle, tmp_path):
    from gift_fast.cil_trainer import CILConfig, CILTrainer
    tr = CILTrainer(_cfg(tmp_path / "t", fake_root, method="finetune", synth=None),
                    CILConfig("tinyimagenet-cil", 5), bundle=bundle)
    assert tr.cfg.label_smoothing == 0.0 and tr.weight_decay == 0.1
    assert tr.step_iterations == [100 // 8] + [20 // 8] * 5            # one epoch of each step's images
    step, optimizer, _ = tr.make_step(1e-5)
    assert all(g["weight_decay"] == 0.1 for g in optimizer.param_groups)
    assert step.cfg.label_smoothing == 0.0


def test_config_errors():
    from gift_fast.cil_trainer import CILConfig, parse_class_order
    with pytest.raises(ValueError, match="equal steps"):
        CILConfig("cifar100-cil", 7)
    with pytest.raises(ValueError, match="unknown class-incremental benchmark"):
        CILConfig("imagenet-cil", 10)
    with pytest.raises(ValueError, match="--class-order"):
        CILConfig("cifar100-cil", 10, class_order="random")
    assert parse_class_order("seed:7") == ("seeded", 7) and parse_class_order("icarl") == ("icarl", None)


def test_report_table_next_to_the_seed():
    from gift_fast.cil_trainer import cil_report_table
    runs = [{"benchmark": "cifar100-cil", "cil_steps": 10, "label": "gift", "seed": s, "avg": a, "last": l,
             "step_accuracies": [0.0] * 10, "zero_shot": {"avg": 70.0, "last": 60.0}}
            for s, a, l in ((0, 80.0, 70.0), (1, 82.0, 72.0))]
    text = cil_report_table(runs)
    assert "| GIFT | 85.11 | 77.70 | the paper, Tab. 7 |" in text
    assert "| RPSNet | 68.60 | 57.05 |" in text
    assert "| gift (measured) | 81.00 ± 1.41 | 71.00 ± 1.41 | this project, seeds 0, 1 |" in text
    assert "| CLIP Zero-shot (measured) | 70.00 ± 0.00 | 60.00 ± 0.00 |" in text
    with pytest.raises(ValueError, match="one table"):
        cil_report_table(runs + [dict(runs[0], cil_steps=20)])


def test_command_line(fake_root, tmp_path):
    from gift_fast.cli.main import main
    out = tmp_path / "cli"
    args = ["train", "--benchmark", "tinyimagenet-cil", "--steps", "2", "--data-root", fake_root, "--model", "toy-vit",
            "--pretrained", "none", "--method", "finetune", "--iterations", "1", "--batch-size", "8",
            "--device", "cpu", "--data-cache", "none", "--num-workers", "0", "--out", str(out), "--quiet",
            "--no-plots"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "tinyimagenet-cil, 2 steps (3 training steps)" in res.output
    assert (out / "report.md").is_file()
    m = json.load(open(out / "metrics.json"))
    assert m["cil_steps"] == 2 and len(m["step_accuracies"]) == 3
    res = CliRunner().invoke(main, args[:3] + args[5:])                  # no --steps
    assert res.exit_code != 0 and "needs --increments" in res.output
    res = CliRunner().invoke(main, args + ["--order", "1"])
    assert res.exit_code != 0 and "MTIL option" in res.output
    res = CliRunner().invoke(main, ["train", "--class-order", "icarl", "--preset", "tiny"])
    assert res.exit_code != 0 and "class-incremental" in res.output

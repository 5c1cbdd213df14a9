"""The continual loop: one step against a hand-written step, teacher and anchor, resume, method flags, errors."""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from gift_fast.data.synthetic import load_synthetic_set
from gift_fast.checkpoints import read_state_dict, save_model
from gift_fast.models import create_clip
from toy_runs import init_checkpoint, toy_run_config
from gift_fast.batches import derived_seed as _derived_seed, STREAM_SYN, STREAM_TASK
from gift_fast.data.cache import normalize_uint8
from gift_fast.teacher import embed_distill_set
from gift_fast.train import ContinualTrainer, resolve_method


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    """A fixed random tiny CLIP as the 'pre-trained' model (every run starts from the same weights)."""
    return init_checkpoint(tmp_path_factory, seed=123)


def cfg_for(tmp_path, init_ckpt, **kw):
    return toy_run_config(tmp_path / "run", init_ckpt, **kw)


# ----------------------------------------------------------------------------- one step, by hand
def _soft_ce(z, p):
    return -(p * torch.log_softmax(z, dim=1)).sum(1).mean()


def _hand_steps(model, teacher, task, syn, cfg, steps):
    """docs/METHOD.md's GIFT steps written out (no project code in the math): KD grads -> Fisher -> penalty; + CE; AdamW."""
    s = float(model.logit_scale.exp())
    tau, ls = cfg.temperature, cfg.label_smoothing
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    anchor = {n: p.detach().clone() for n, p in params}
    n_ = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    tok = syn["tokenizer"]
    with torch.no_grad():
        It_all = teacher.encode_image(syn["x_all"])
        Tt_all = teacher.encode_text(tok(syn["prompts"]))
    m_state = {n: torch.zeros_like(p) for n, p in params}
    v_state = {n: torch.zeros_like(p) for n, p in params}
    g_task = torch.Generator().manual_seed(_derived_seed(cfg.seed, 0, STREAM_TASK))
    task_perm = torch.randperm(len(task.train), generator=g_task)
    g_syn = torch.Generator().manual_seed(_derived_seed(cfg.seed, 0, STREAM_SYN))
    n_syn = len(syn["labels"])
    # epochs of permutations; each epoch drops its partial batch
    syn_perm = torch.cat([torch.randperm(n_syn, generator=g_syn)[: n_syn - n_syn % cfg.syn_batch_size]
                          for _ in range(steps)])
    x_task, y_task = task.train.tensors
    class_tokens = tok(task.prompts())
    for k in range(steps):
        ti = task_perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        si = syn_perm[k * cfg.syn_batch_size:(k + 1) * cfg.syn_batch_size]
        lab = syn["labels"][si]
        I = n_(model.encode_image(syn["x_all"][si]))
        T = n_(model.encode_text(tok([syn["prompts"][j] for j in lab.tolist()])))
        It, Tt = n_(It_all[si]), n_(Tt_all[lab])
        S, St = s * I @ T.T, s * It @ Tt.T
        cd = tau ** 2 * (_soft_ce(S / tau, torch.softmax(St / tau, 1)) + _soft_ce(S.T / tau, torch.softmax(St.T / tau, 1)))
        same = (lab[:, None] == lab[None, :]).float()
        A = (1 - ls) * same / same.sum(1, keepdim=True) + ls / len(lab)
        ita = _soft_ce(S, A) + _soft_ce(S.T, A.T)
        g_kd = torch.autograd.grad(cfg.cd_weight * cd + cfg.ita_weight * ita, [p for _, p in params], allow_unused=True)
        img = n_(model.encode_image(x_task[ti]))
        txt = n_(model.encode_text(class_tokens))
        ce = F.cross_entropy(s * img @ txt.T, y_task[ti], label_smoothing=ls)
        g_ce = torch.autograd.grad(ce, [p for _, p in params], allow_unused=True)
        lr = cfg.lr * min(1.0, (k + 1) / cfg.warmup)
        with torch.no_grad():
            for (name, p), gk, gc in zip(params, g_kd, g_ce):
                gk = torch.zeros_like(p) if gk is None else gk
                gc = torch.zeros_like(p) if gc is None else gc
                msq = (gk ** 2).mean()
                Fi = gk ** 2 / msq if msq > 0 else torch.full_like(p, 1e-6)
                g = gk + 2 * cfg.l2 * Fi * (p - anchor[name]) + gc
                m_state[name].mul_(0.9).add_(0.1 * g)
                v_state[name].mul_(0.999).add_(0.001 * g * g)
                mh = m_state[name] / (1 - 0.9 ** (k + 1))
                vh = v_state[name] / (1 - 0.999 ** (k + 1))
                p -= lr * mh / (vh.sqrt() + 1e-8)
    return model


def test_gift_steps_match_a_hand_written_step(tmp_path, init_ckpt):
    cfg = cfg_for(tmp_path, init_ckpt, tasks=["ToyShapes"], steps=2, l2=3.0)
    trainer = ContinualTrainer(cfg)
    trainer.run()
    got = read_state_dict(trainer.checkpoint_path(0))

    bundle = create_clip("toy-vit-test", init_ckpt)
    model, teacher = bundle.model, copy.deepcopy(bundle.model)
    dset = load_synthetic_set(tmp_path / "run" / "synthetic", "ToyShapes", image_size=32, progress=False)
    syn = dict(x_all=normalize_uint8(dset.images, bundle.mean, bundle.std), labels=dset.labels, prompts=dset.prompts,
               tokenizer=bundle.tokenizer)
    _hand_steps(model, teacher, trainer.tasks[0], syn, cfg, steps=2)
    moved = sum(int(not torch.equal(w, teacher.state_dict()[n])) for n, w in model.state_dict().items())
    assert moved > 10                                   # the steps did change the weights
    for name, want in model.state_dict().items():
        have = got[name]
        if name.endswith("attn.in_proj_bias"):
            # The key bias has a zero gradient in exact arithmetic (softmax ignores a constant per
            # query); Adam turns its rounding noise into steps of either sign. Compare q and v only.
            d = want.shape[0] // 3
            want, have = torch.cat([want[:d], want[2 * d:]]), torch.cat([have[:d], have[2 * d:]])
        torch.testing.assert_close(have, want, rtol=1e-4, atol=2e-6, msg=name)


# ----------------------------------------------------------------------------- teacher and anchor
class Recording(ContinualTrainer):
    def teacher_embeddings(self, distill_set, tokens):
        out = super().teacher_embeddings(distill_set, tokens)
        self.__dict__.setdefault("recorded", []).append((distill_set, tokens, out))
        return out


@pytest.mark.parametrize("teacher", ["last", "initial", "wise:0.25"])
def test_teacher_and_anchor_are_the_previous_tasks_weights(tmp_path, init_ckpt, teacher):
    cfg = cfg_for(tmp_path, init_ckpt, teacher=teacher)
    trainer = Recording(cfg)
    trainer.run()
    init = read_state_dict(init_ckpt)
    after1 = read_state_dict(trainer.checkpoint_path(0))
    for name in trainer.awc.names():                     # anchor of task 2 = weights after task 1
        assert torch.equal(trainer.awc.anchor(name), after1[name]), name
    kw = dict(mean=trainer.bundle.mean, std=trainer.bundle.std, device=torch.device("cpu"))
    ref = create_clip("toy-vit-test", None).model
    for t, (dset, tokens, (img, txt)) in enumerate(trainer.recorded):
        if teacher == "last" or t == 0:
            state = init if t == 0 else after1
        elif teacher == "initial":
            state = init
        else:
            state = {k: 0.25 * init[k] + 0.75 * after1[k] for k in init}
        ref.load_state_dict(state)
        want_img, want_txt = embed_distill_set(ref, dset, tokens, **kw)
        torch.testing.assert_close(img, want_img, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(txt, want_txt, rtol=1e-5, atol=1e-6)
    assert not torch.equal(init["visual.conv1.weight"], after1["visual.conv1.weight"])


# ----------------------------------------------------------------------------- run folder and resume
class Crash(ContinualTrainer):
    def train_task(self, t):
        if t == 1:
            raise KeyboardInterrupt("simulated Ctrl-C in task 2")
        return super().train_task(t)


def test_resume_gives_the_same_final_metrics_as_an_uninterrupted_run(tmp_path, init_ckpt):
    tasks = ["ToyShapes", "ToyColours", "ToyDigits"]
    full = ContinualTrainer(cfg_for(tmp_path / "a", init_ckpt, tasks=tasks)).run()
    cfg = cfg_for(tmp_path / "b", init_ckpt, tasks=tasks)
    with pytest.raises(KeyboardInterrupt):
        Crash(cfg).run()
    state = json.loads((tmp_path / "b" / "run" / "state.json").read_text())
    assert state["finished"] == 1 and not (tmp_path / "b" / "run" / "metrics.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        ContinualTrainer(cfg).run()
    with pytest.raises(ValueError, match="other settings.*lr"):
        ContinualTrainer(dataclasses.replace(cfg, resume=True, lr=2e-3)).run()
    resumed = ContinualTrainer(dataclasses.replace(cfg, resume=True)).run()
    assert resumed["transfer"] == full["transfer"] and resumed["last"] == full["last"]
    # against what the run's files say, not only against the other run: each row of the accuracy
    # matrix is the accuracy of that task's checkpoint, and the metrics are that matrix's
    from gift_fast.evaluate import evaluate_tasks

    state = json.loads((tmp_path / "b" / "run" / "state.json").read_text())
    trainer = ContinualTrainer(cfg_for(tmp_path / "c", init_ckpt, tasks=tasks))
    for t in range(3):
        trainer.model.load_state_dict(read_state_dict(tmp_path / "b" / "run" / state["checkpoints"][t]))
        row = evaluate_tasks(trainer.model, trainer.bundle.tokenizer, trainer.tasks, device=torch.device("cpu"),
                             batch_size=64, num_workers=0, progress=False)
        assert row == pytest.approx(state["acc"][t], abs=1e-9), t
    acc = state["acc"]
    assert resumed["transfer"] == pytest.approx((acc[0][1] + (acc[0][2] + acc[1][2]) / 2) / 2, abs=1e-9)
    assert resumed["last"] == pytest.approx(sum(acc[2]) / 3, abs=1e-9)
    a = (tmp_path / "a" / "run" / "acc_matrix.csv").read_text()
    b = (tmp_path / "b" / "run" / "acc_matrix.csv").read_text()
    assert a == b
    for t in range(3):
        wa = read_state_dict(tmp_path / "a" / "run" / "checkpoints" / f"task_{t + 1:02d}_{tasks[t]}.safetensors")
        wb = read_state_dict(tmp_path / "b" / "run" / "checkpoints" / f"task_{t + 1:02d}_{tasks[t]}.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_folder_contents(tmp_path, init_ckpt):
    cfg = cfg_for(tmp_path, init_ckpt, plots=True, keep_synth=False, log_every=1)
    metrics = ContinualTrainer(cfg).run()
    run = tmp_path / "run"
    for f in ("config.json", "log.jsonl", "acc_matrix.csv", "metrics.json", "state.json", "acc_matrix.png",
              "acc_curves.png", "checkpoints/task_01_ToyShapes.safetensors",
              "checkpoints/task_02_ToyColours.safetensors"):
        assert (run / f).is_file(), f
    assert not (run / "synthetic" / "ToyShapes_Syn").exists()       # on-the-fly images are discarded
    rows = (run / "acc_matrix.csv").read_text().splitlines()
    assert rows[0] == "after,ToyShapes,ToyColours" and rows[1].startswith("zero-shot,") and len(rows) == 4
    acc = [[float(v) for v in r.split(",")[1:]] for r in rows[2:]]
    # two tasks: Transfer = task 2 before it is learned, Avg = all four, Last = the last row
    assert metrics["transfer"] == pytest.approx(acc[0][1], abs=1e-3)
    assert metrics["avg"] == pytest.approx((acc[0][0] + acc[0][1] + acc[1][0] + acc[1][1]) / 4, abs=1e-3)
    assert metrics["last"] == pytest.approx((acc[1][0] + acc[1][1]) / 2, abs=1e-3)
    logs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 4 and {"loss_ce", "loss_kd", "loss_awc", "lr", "images_per_s"} <= set(logs[0])
    assert logs[0]["lr"] == pytest.approx(1e-3) and logs[1]["task"] == "ToyShapes"   # lr after the 1st step
    conf = json.loads((run / "config.json").read_text())
    assert conf["method"]["consolidation"] == "adaptive" and conf["tasks"] == ["ToyShapes", "ToyColours"]


def test_keep_last_checkpoint_only(tmp_path, init_ckpt):
    cfg = cfg_for(tmp_path, init_ckpt, method="finetune", synth=None, keep_checkpoints="last")
    ContinualTrainer(cfg).run()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["task_02_ToyColours.safetensors"]


# ----------------------------------------------------------------------------- methods as flags
def _computes(trainer):
    """What a trainer's steps compute, as a flat dict."""
    step, _, _ = trainer.make_step(1e-3)
    c = step.cfg
    return {"distill": c.distill, "cd_weight": c.cd_weight, "ita_weight": c.ita_weight,
            "consolidation": None if trainer.awc is None else trainer.awc.fisher_kind,
            "teacher": trainer.method.teacher, "label_smoothing": c.label_smoothing, "temperature": c.temperature,
            "logit_scale": c.logit_scale, "bf16": c.bf16}


@pytest.mark.parametrize("kw, changed", [
    (dict(method="finetune", synth=None), {"distill": "none", "cd_weight": 0.0, "ita_weight": 0.0,
                                           "consolidation": None}),
    (dict(method="l2", synth=None), {"distill": "none", "cd_weight": 0.0, "ita_weight": 0.0,
                                     "consolidation": "uniform"}),
    (dict(method="ewc-v"), {"consolidation": "static"}),
    (dict(cd=False), {"cd_weight": 0.0}),
    (dict(ita=False), {"ita_weight": 0.0}),
    (dict(awc=False), {"consolidation": None}),
    (dict(consolidation="uniform"), {"consolidation": "uniform"}),
    (dict(distill="image-only"), {"distill": "image_only"}),
    (dict(distill="text-only"), {"distill": "text_only"}),
    (dict(distill="kl"), {"distill": "kl"}),
    (dict(distill="feature"), {"distill": "feature"}),      # ITA stays on (the authors' code)
    (dict(teacher="initial"), {"teacher": "initial"}),
    (dict(teacher="wise:0.2"), {"teacher": "wise:0.2"}),
    (dict(ita_weight=1.0), {"ita_weight": 1.0}),
    (dict(method="l2", cd=True), {"ita_weight": 0.0, "consolidation": "uniform"}),   # Tab. 3, row "+CD"
])
def test_each_flag_changes_what_it_should_and_nothing_else(tmp_path, init_ckpt, kw, changed):
    base = _computes(ContinualTrainer(cfg_for(tmp_path / "base", init_ckpt)))
    assert base["distill"] == "contrastive" and base["consolidation"] == "adaptive"
    got = _computes(ContinualTrainer(cfg_for(tmp_path / "x", init_ckpt, **kw)))
    diff = {k: got[k] for k in got if got[k] != base[k]}
    assert diff == changed


def test_finetune_step_is_cross_entropy_alone(tmp_path, init_ckpt):
    cfg = cfg_for(tmp_path, init_ckpt, method="finetune", synth=None, tasks=["ToyShapes"], steps=1)
    trainer = ContinualTrainer(cfg)
    trainer.run()
    got = read_state_dict(trainer.checkpoint_path(0))
    model = create_clip("toy-vit-test", init_ckpt).model
    task = trainer.tasks[0]
    g = torch.Generator().manual_seed(_derived_seed(0, 0, STREAM_TASK))
    idx = torch.randperm(len(task.train), generator=g)[:cfg.batch_size]
    x, y = task.train.tensors
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr / cfg.warmup,
                            betas=(0.9, 0.999), weight_decay=0.0)
    img = F.normalize(model.encode_image(x[idx]), dim=-1)
    txt = F.normalize(model.encode_text(trainer.bundle.tokenize(task.prompts())), dim=-1)
    F.cross_entropy(float(model.logit_scale.exp()) * img @ txt.T, y[idx], label_smoothing=0.2).backward()
    opt.step()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for k, v in model.state_dict().items():
        g = grads.get(k)
        if g is not None:
            # Adam's first step is ~lr * sign(g): where the gradient is rounding noise (the key part of
            # in_proj_bias has an exactly-zero true gradient) its sign, and so the weight, is arbitrary
            keep = g.abs() > 1e-4 * g.abs().max()
            got_k, v = got[k][keep], v[keep]
        else:
            got_k = got[k]
        torch.testing.assert_close(got_k, v, rtol=1e-4, atol=1e-6, msg=k)


# The EWC-V Fisher (estimated before each task, then fixed) is checked against a hand computation
# over two tasks in test_train_plumbing.py.


# ----------------------------------------------------------------------------- errors
def test_bad_input_gives_clear_errors(tmp_path, init_ckpt):
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        resolve_method("sgd")
    with pytest.raises(ValueError, match="unknown distillation loss"):
        resolve_method("gift", distill="cosine")
    with pytest.raises(ValueError, match=r"wise:0.2"):
        resolve_method("gift", teacher="wise:1.5")
    with pytest.raises(ValueError, match="CD and ITA are both off"):
        resolve_method("gift", cd=False, ita=False)
    with pytest.raises(ValueError, match="unknown order 3"):
        ContinualTrainer(cfg_for(tmp_path, init_ckpt, toy=False, tasks=None, order=3, data_root=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown task"):
        ContinualTrainer(cfg_for(tmp_path, init_ckpt, toy=False, tasks=["ToyShapes", "Imagenet"]))
    with pytest.raises(ValueError, match="--synth DIR"):
        ContinualTrainer(cfg_for(tmp_path, init_ckpt, synth=None))
    with pytest.raises(FileNotFoundError, match="gift-fast synth"):
        ContinualTrainer(cfg_for(tmp_path, init_ckpt, synth=str(tmp_path / "nowhere")))
    (tmp_path / "empty_synth").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no synthetic folder for task\(s\) \['ToyShapes', 'ToyColours'\]"):
        ContinualTrainer(cfg_for(tmp_path, init_ckpt, synth=str(tmp_path / "empty_synth")))
    wrong = save_model(create_clip("toy-vit", None).model, tmp_path / "big.safetensors")
    with pytest.raises(ValueError, match="does not fit this model's architecture"):
        ContinualTrainer(cfg_for(tmp_path, init_ckpt, pretrained=str(wrong)))


def test_non_finite_loss_stops_the_run_with_a_clear_message(tmp_path, init_ckpt, monkeypatch):
    from gift_fast.step import GiftStep

    real = GiftStep.__call__

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        out["loss_ce"] = out["loss_ce"] * float("nan")
        return out

    monkeypatch.setattr(GiftStep, "__call__", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss in task 1 .*--lr"):
        ContinualTrainer(cfg_for(tmp_path, init_ckpt, method="finetune", synth=None)).run()


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    from click.testing import CliRunner

    from gift_fast.cli.main import main

    r = CliRunner().invoke(main, ["train", "--method", "sgd", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "unknown method 'sgd'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["train", "--order", "3", "--method", "finetune", "--out", str(tmp_path / "y"),
                                  "--data-root", str(tmp_path), "--pretrained", "none", "--model", "toy-vit-test"])
    assert r.exit_code != 0 and "unknown order 3" in r.output


def test_cli_tiny_preset_smoke(tmp_path):
    from click.testing import CliRunner

    from gift_fast.cli.main import main

    out = tmp_path / "tiny"
    args = ["train", "--preset", "tiny", "--model", "toy-vit-test", "--pretrained", "none", "--steps", "2",
            "--images-per-task", "8", "--seeds", "0", "--jobs", "1", "--out", str(out), "--quiet", "--no-plots",
            "--tasks", "ToyShapes,ToyColours"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "| gift | 1 |" in r.output and "| finetune | 1 |" in r.output and "Zero-shot" in r.output
    assert (out / "report.md").is_file() and (out / "gift-seed0" / "metrics.json").is_file()
    r2 = CliRunner().invoke(main, args + ["--resume"])          # everything finished: report again, no training
    assert r2.exit_code == 0 and "| gift | 1 |" in r2.output
    r3 = CliRunner().invoke(main, ["report", str(out)])
    assert r3.exit_code == 0 and "Transfer per data set" in r3.output

"""The continual loop's plumbing, checked against values computed here: the lr schedule at its
first, warm-up, middle and last steps; the on-the-fly class pool (the prompts the generator gets
are the `synth` engine's, and never name a class of the task being learned); the CPU RNG state
across an in-task resume where a random draw depends on it; the EWC-V Fisher of the second task
against one computed by hand from that task's synthetic batches."""
import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F

from gift_fast.checkpoints import read_state_dict
from gift_fast.models import create_clip
from toy_runs import init_checkpoint, toy_run_config
from gift_fast.batches import derived_seed as _derived_seed, STREAM_FISHER
from gift_fast.data.cache import normalize_uint8
from gift_fast.schedule import cosine_lr_lambda
from gift_fast.train import ContinualTrainer


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    return init_checkpoint(tmp_path_factory, seed=321)


def cfg_for(tmp_path, init_ckpt, **kw):
    return toy_run_config(tmp_path / "run", init_ckpt, **{"warmup": 1, **kw})


# ----------------------------------------------------------------------------- the lr schedule
def _cosine(k, warmup, steps):
    """The authors' schedule written out: (k + 1) / warmup, then 0.5 (1 + cos(pi (k - warmup) / (steps - warmup)))."""
    if k < warmup:
        return (k + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (k - warmup) / (steps - warmup)))


def test_cosine_schedule_against_its_formula():
    f = cosine_lr_lambda(10, 50)
    assert f(0) == pytest.approx(0.1, abs=1e-12)                 # first step
    assert f(9) == pytest.approx(1.0, abs=1e-12)                 # last warm-up step
    assert f(10) == pytest.approx(1.0, abs=1e-12)                # the cosine starts at 1
    assert f(30) == pytest.approx(0.5, abs=1e-12)                # half-way through the cosine
    assert f(49) == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 40)), abs=1e-12)   # last step
    assert f(50) == pytest.approx(0.0, abs=1e-12)                # ends at 0
    for k in range(51):
        assert f(k) == pytest.approx(_cosine(k, 10, 50), abs=1e-12), k


def test_the_trainers_learning_rate_follows_the_schedule(tmp_path, init_ckpt):
    """The lr each step of a task uses (LambdaLR in make_step), warmup 4 of 12 steps."""
    cfg = cfg_for(tmp_path, init_ckpt, method="finetune", synth=None, steps=12, warmup=4, lr=2e-3)
    trainer = ContinualTrainer(cfg)
    _, optimizer, scheduler = trainer.make_step(2e-3)
    lrs = []
    for _ in range(cfg.steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()           # no gradients: nothing moves, the schedule advances
        scheduler.step()
    want = [2e-3 * _cosine(k, 4, 12) for k in range(13)]
    assert lrs == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert lrs[0] == pytest.approx(5e-4) and lrs[3] == pytest.approx(2e-3) and lrs[8] == pytest.approx(1e-3)
    assert lrs[12] == pytest.approx(0.0, abs=1e-15)


# ----------------------------------------------------------------------------- the on-the-fly class pool
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
TEXTURES = ("plain", "stripes", "checks", "dots", "grid", "waves")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


def _csv_texts(folder):
    import csv

    with open(folder / "image_text.csv", newline="") as fh:
        return [r["text"] for r in csv.DictReader(fh)]


def test_on_the_fly_prompts_are_the_engines_and_leave_out_the_task_being_learned(tmp_path, init_ckpt):
    from gift_fast.toy import BASE_CLASSNAMES, ToyGenerator
    from gift_fast.synth.engine import synthesize_sequence

    n = 80
    cfg = cfg_for(tmp_path, init_ckpt, tasks=["ToyShapes", "ToyTextures"], images_per_task=n, synth_seed=5)
    trainer = ContinualTrainer(cfg)
    for t in range(2):
        trainer.distill_set(t)
    fly = [_csv_texts(tmp_path / "run" / "synthetic" / f"{name}_Syn") for name in cfg.tasks]
    synthesize_sequence(ToyGenerator(), [(task.name, task.classnames) for task in trainer.tasks], tmp_path / "engine",
                        images_per_task=n, seed=5, base_classnames=list(BASE_CLASSNAMES), image_format="png",
                        progress=False)
    engine = [_csv_texts(tmp_path / "engine" / f"{name}_Syn") for name in cfg.tasks]
    assert fly == engine and len(fly[1]) == n
    words = lambda p: set(re.findall(r"[a-z]+", p.lower()))  # noqa: E731
    # task 2 (ToyTextures) draws from the base names and ToyShapes' names: never a texture
    assert not [p for p in fly[1] if words(p) & set(TEXTURES)]
    # ... and the learned task's names are in its pool (a shape without a colour is a ToyShapes class)
    assert [p for p in fly[1] if words(p) & set(SHAPES) and not words(p) & set(COLOURS)]
    # task 1 draws from the base names only: every prompt names a colour
    assert all(words(p) & set(COLOURS) for p in fly[0])


def test_on_the_fly_synthesis_follows_the_authors_seed_scheme_when_asked(tmp_path, init_ckpt):
    import json

    from gift_fast.synth.engine import synthesize_sequence
    from gift_fast.toy import BASE_CLASSNAMES, ToyGenerator
    from gift_fast.validation import OptionError, check_train_config

    n = 40
    cfg = cfg_for(tmp_path, init_ckpt, tasks=["ToyShapes", "ToyTextures"], images_per_task=n, synth_seed=5,
                  synth_seed_scheme="authors")
    trainer = ContinualTrainer(cfg)
    for t in range(2):
        trainer.distill_set(t)
    run_syn = tmp_path / "run" / "synthetic"
    synthesize_sequence(ToyGenerator(), [(task.name, task.classnames) for task in trainer.tasks], tmp_path / "engine",
                        images_per_task=n, seed=5, base_classnames=list(BASE_CLASSNAMES), image_format="png",
                        progress=False, seed_scheme="authors")
    for name in cfg.tasks:
        assert _csv_texts(run_syn / f"{name}_Syn") == _csv_texts(tmp_path / "engine" / f"{name}_Syn")
        manifest = json.loads((run_syn / f"{name}_Syn" / "manifest.json").read_text())
        assert manifest["seed_scheme"] == "authors"
        # the same image seeds as `gift-fast synth --seed-scheme authors`: the same pixels
        fly_png, engine_png = run_syn / f"{name}_Syn" / "7.png", tmp_path / "engine" / f"{name}_Syn" / "7.png"
        assert fly_png.read_bytes() == engine_png.read_bytes()
    hashed = ContinualTrainer(dataclasses.replace(cfg, out=str(tmp_path / "hashed"), synth_seed_scheme="hash"))
    hashed.distill_set(0)
    assert _csv_texts(tmp_path / "hashed" / "synthetic" / "ToyShapes_Syn") != _csv_texts(run_syn / "ToyShapes_Syn")
    with pytest.raises(OptionError, match="--seed-scheme authors sets the prompts and seeds of on-the-fly"):
        check_train_config(dataclasses.replace(cfg, synth=str(tmp_path / "engine")))


# ----------------------------------------------------------------------------- CPU RNG across an in-task resume
class _Stop(Exception):
    pass


def _dropout_bundle(init_ckpt):
    """The test CLIP with dropout after the image tower: every training step draws from the CPU RNG
    (the shipped towers draw nothing; a user model with dropout does)."""
    bundle = create_clip("toy-vit-test", init_ckpt)
    bundle.model.visual.register_forward_hook(lambda mod, inp, out: F.dropout(out, 0.5, mod.training))
    return bundle


def _run_resumed(tmp_path, cfg, init_ckpt, monkeypatch, stop_at):
    from gift_fast.step import GiftStep

    real, calls = GiftStep.__call__, [0]

    def stopping(self, *a, **kw):
        calls[0] += 1
        if calls[0] == stop_at:
            raise _Stop
        return real(self, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(GiftStep, "__call__", stopping)
        with pytest.raises(_Stop):
            ContinualTrainer(cfg, bundle=_dropout_bundle(init_ckpt)).run()
    ContinualTrainer(dataclasses.replace(cfg, resume=True), bundle=_dropout_bundle(init_ckpt)).run()
    return read_state_dict(tmp_path / "run" / "checkpoints" / "task_01_ToyShapes.safetensors")


def test_in_task_resume_restores_the_cpu_rng_a_dropout_draw_depends_on(tmp_path, init_ckpt, monkeypatch):
    kw = dict(method="finetune", synth=None, tasks=["ToyShapes"], steps=6, warmup=2, checkpoint_every=2)
    ContinualTrainer(cfg_for(tmp_path / "a", init_ckpt, **kw), bundle=_dropout_bundle(init_ckpt)).run()
    want = read_state_dict(tmp_path / "a" / "run" / "checkpoints" / "task_01_ToyShapes.safetensors")
    # stopped before step 4: resumes from the in-task checkpoint of step 2
    got = _run_resumed(tmp_path / "b", cfg_for(tmp_path / "b", init_ckpt, **kw), init_ckpt, monkeypatch, stop_at=4)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7, msg=name)
    # the draws matter: a resume that keeps the RNG state it happens to have ends elsewhere
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    other = _run_resumed(tmp_path / "c", cfg_for(tmp_path / "c", init_ckpt, **kw), init_ckpt, monkeypatch, stop_at=4)
    assert max(float((other[n] - want[n]).abs().max()) for n in want) > 1e-5


# ----------------------------------------------------------------------------- EWC-V: one Fisher per task
def _hand_kd(model, x, tokens, labels, t_img, t_txt, cfg):
    """CD + ITA of METHOD.md written out (the same formulas as test_train's hand-written step)."""
    s, tau, ls = float(model.logit_scale.exp()), cfg.temperature, cfg.label_smoothing
    n_ = lambda v: v / v.norm(dim=-1, keepdim=True)  # noqa: E731
    soft_ce = lambda z, p: -(p * torch.log_softmax(z, dim=1)).sum(1).mean()  # noqa: E731
    I, T, It, Tt = n_(model.encode_image(x)), n_(model.encode_text(tokens)), n_(t_img), n_(t_txt)
    S, St = s * I @ T.T, s * It @ Tt.T
    cd = tau ** 2 * (soft_ce(S / tau, torch.softmax(St / tau, 1)) + soft_ce(S.T / tau, torch.softmax(St.T / tau, 1)))
    same = (labels[:, None] == labels[None, :]).float()
    A = (1 - ls) * same / same.sum(1, keepdim=True) + ls / len(labels)
    ita = soft_ce(S, A) + soft_ce(S.T, A.T)
    return cfg.cd_weight * cd + cfg.ita_weight * ita


def test_ewc_v_fisher_of_the_second_task_is_its_own(tmp_path, init_ckpt):
    """Task 2's static Fisher = the mean of g^2 / mean(g^2) over its fisher_batches synthetic batches,
    at the weights after task 1: nothing of task 1's estimate."""
    from gift_fast.data.synthetic import load_synthetic_set
    
    cfg = cfg_for(tmp_path, init_ckpt, method="ewc-v", fisher_batches=2, steps=2)
    trainer = ContinualTrainer(cfg)
    trainer.run()
    assert trainer.awc.num_fisher_updates == 2
    bundle = create_clip("toy-vit-test", str(trainer.checkpoint_path(0)))      # the weights after task 1
    model, tok = bundle.model, bundle.tokenizer
    dset = load_synthetic_set(tmp_path / "run" / "synthetic", "ToyColours", image_size=32, progress=False)
    x_all = normalize_uint8(dset.images, bundle.mean, bundle.std)
    tokens = tok(dset.prompts)
    with torch.no_grad():                                           # the "last" teacher: the same weights
        t_img, t_txt = model.encode_image(x_all), model.encode_text(tokens)
    g = torch.Generator().manual_seed(_derived_seed(cfg.seed, 1, STREAM_FISHER))
    n, b = len(dset), cfg.syn_batch_size
    order = torch.cat([torch.randperm(n, generator=g)[: n - n % b] for _ in range(cfg.fisher_batches)])
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    fisher = {name: torch.zeros_like(p) for name, p in params}
    for k in range(cfg.fisher_batches):
        i = order[k * b:(k + 1) * b]
        lab = dset.labels[i]
        loss = _hand_kd(model, x_all[i], tokens[lab], lab, t_img[i], t_txt[lab], cfg)
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        for (name, p), gk in zip(params, grads):
            sq = torch.zeros_like(p) if gk is None else gk.detach() ** 2
            fisher[name] += (sq / sq.mean() if sq.mean() > 0 else torch.full_like(p, 1e-6)) / cfg.fisher_batches
    assert trainer.awc.names() == [name for name, _ in params]
    for name in trainer.awc.names():
        torch.testing.assert_close(trainer.awc.fisher(name), fisher[name], rtol=2e-3, atol=2e-4, msg=name)

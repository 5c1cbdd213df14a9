"""GiftStep against a hand-written step (float64), and the fast switches against the plain ones."""
import copy

import pytest
import torch
import torch.nn.functional as F

from gift_fast.awc import AdaptiveWeightConsolidation
from gift_fast.losses import DISTILL_MODES as LOSS_DISTILL_MODES
from gift_fast.precision import Precision, autocast
from gift_fast.step import DISTILL_MODES, GiftStep, StepConfig, compile_blocks, distillation_loss


def tiny_clip(dtype=torch.float64):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    m = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(image_size=16, patch_size=8, width=32, layers=2, head_width=16),
             text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=2))
    m.logit_scale.requires_grad_(False)
    return m.to(dtype)


def batch(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(images=torch.randn(6, 3, 16, 16, generator=g, dtype=dtype), labels=torch.tensor([0, 1, 2, 1, 0, 2]),
                class_tokens=torch.randint(1, 64, (3, 8), generator=g),
                syn_images=torch.randn(5, 3, 16, 16, generator=g, dtype=dtype),
                syn_tokens=torch.randint(1, 64, (5, 8), generator=g), syn_labels=torch.tensor([0, 1, 1, 2, 3]))


def teacher_embeddings(teacher, b):
    with torch.no_grad():
        return teacher.encode_image(b["syn_images"]), teacher.encode_text(b["syn_tokens"])


def hand_step(model, teacher_img, teacher_txt, anchor, b, lr):
    """docs/METHOD.md's step written out: L_kd grads -> Fisher -> penalty grad; + CE grads; AdamW."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    I, T = n(model.encode_image(b["syn_images"])), n(model.encode_text(b["syn_tokens"]))
    It, Tt = n(teacher_img), n(teacher_txt)
    S, St = 100 * I @ T.T, 100 * It @ Tt.T
    soft = lambda z, p: -(p * torch.log_softmax(z, 1)).sum(1).mean()  # noqa: E731
    cd = 4 * (soft(S / 2, torch.softmax(St / 2, 1)) + soft(S.T / 2, torch.softmax(St.T / 2, 1)))
    k = b["syn_labels"]
    A = (k[:, None] == k[None, :]).double()
    A = 0.8 * A / A.sum(1, keepdim=True) + 0.2 / len(k)
    ita = soft(S, A) + soft(S.T, A)
    kd_grads = torch.autograd.grad(cd + 0.25 * ita, [p for _, p in params], allow_unused=True)
    img = n(model.encode_image(b["images"]))
    txt = n(model.encode_text(b["class_tokens"]))
    ce = F.cross_entropy(100 * img @ txt.T, b["labels"], label_smoothing=0.2)
    ce_grads = torch.autograd.grad(ce, [p for _, p in params], allow_unused=True)
    for (name, p), gk, gc in zip(params, kd_grads, ce_grads):
        gk = torch.zeros_like(p) if gk is None else gk
        gc = torch.zeros_like(p) if gc is None else gc
        mean = (gk ** 2).mean()
        Fi = gk ** 2 / mean if mean > 0 else torch.full_like(p, 1e-6)
        p.grad = gk + 2 * Fi * (p.detach() - anchor[name]) + gc
    opt = torch.optim.AdamW([p for _, p in params], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    opt.step()


def test_step_matches_hand_written_float64():
    lr = 1e-3
    model = tiny_clip()
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # the student has moved away from the anchor (a later step of the task)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    anchor_model = copy.deepcopy(teacher)
    hand = copy.deepcopy(model)
    b = batch()
    t_img, t_txt = teacher_embeddings(teacher, b)

    awc = AdaptiveWeightConsolidation(model.named_parameters())
    # theta* = the teacher's weights (the start of the task)
    with torch.no_grad():
        saved = [p.detach().clone() for p in model.parameters()]
        for p, q in zip(model.parameters(), anchor_model.parameters()):
            p.copy_(q)
        awc.set_anchor()
        for p, s in zip(model.parameters(), saved):
            p.copy_(s)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    step = GiftStep(model, opt, StepConfig(kernels="torch"), awc=awc)
    out = step(b["images"], b["labels"], b["class_tokens"], b["syn_images"], b["syn_tokens"], b["syn_labels"],
               t_img, t_txt)
    assert set(out) == {"loss_kd", "loss_awc", "loss_ce"} and all(v.dim() == 0 for v in out.values())

    anchor = {n: p.detach().clone() for n, p in anchor_model.named_parameters()}
    hand_step(hand, t_img, t_txt, anchor, b, lr)
    for (name, p), (_, q) in zip(model.named_parameters(), hand.named_parameters()):
        # Adam divides by sqrt(v): round-off of 1e-16 in a tiny gradient moves the update by ~1e-10;
        # a wrong step moves it by ~lr = 1e-3
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9, msg=name)
    assert all(p.grad is None for p in model.parameters())


def test_finetune_switch_uses_ce_only():
    model = tiny_clip()
    ref = copy.deepcopy(model)
    b = batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    out = GiftStep(model, opt, StepConfig(distill="none", kernels="torch"))(b["images"], b["labels"], b["class_tokens"])
    assert set(out) == {"loss_ce"}
    params = [p for p in ref.parameters() if p.requires_grad]
    opt2 = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    n = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    F.cross_entropy(100 * n(ref.encode_image(b["images"])) @ n(ref.encode_text(b["class_tokens"])).T, b["labels"],
                    label_smoothing=0.2).backward()
    opt2.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_fast_switches_match_plain_step_fp32():
    """Triton loss + Triton AWC (flat buckets) vs the torch backend, from the same start."""
    base = tiny_clip(torch.float32)
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    b = batch(torch.float32)
    t_img, t_txt = teacher_embeddings(teacher, b)
    results = []
    for kernels in ("torch", "triton"):
        model = copy.deepcopy(base)
        awc = AdaptiveWeightConsolidation(model.named_parameters(), backend=kernels)
        awc.set_anchor()
        # SGD: the weight change is proportional to the gradient, so the comparison sees its errors
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        step = GiftStep(model, opt, StepConfig(kernels=kernels), awc=awc)
        for _ in range(2):
            out = step(b["images"], b["labels"], b["class_tokens"], b["syn_images"], b["syn_tokens"],
                       b["syn_labels"], t_img, t_txt)
        results.append((model, out))
    (m_ref, o_ref), (m_fast, o_fast) = results
    for k in o_ref:
        torch.testing.assert_close(o_fast[k], o_ref[k], rtol=1e-4, atol=1e-6)
    moved = 0.0
    for (name, p), q, p0 in zip(m_ref.named_parameters(), m_fast.parameters(), base.parameters()):
        # fp32 round-off (different summation orders in the kernels), relative to the update's size
        scale = float((p - p0).abs().max())
        torch.testing.assert_close(q - p0, p - p0, rtol=1e-3, atol=1e-3 * scale + 1e-9, msg=name)
        moved = max(moved, float((p - p0).abs().max()))
    assert moved > 1e-3   # the steps did move the weights


def test_compile_blocks_counts_and_keeps_keys():
    model = tiny_clip(torch.float32)
    keys = list(model.state_dict())
    assert compile_blocks(model) == 4
    assert list(model.state_dict()) == keys


def test_bad_distill_mode():
    with pytest.raises(ValueError, match="distill must be one of"):
        StepConfig(distill="both")


@pytest.mark.parametrize("ita_weight", [0.25, 0.0])
def test_feature_distillation_keeps_ita(ita_weight):
    """--distill feature: weight * (F.mse_loss(n(I'), n(I)) + F.mse_loss(n(T'), n(T))) plus ITA, as the authors'
    --feature_mse run computes it (float64, written out without the project's loss code)."""
    model = tiny_clip()
    b = batch()
    t_img, t_txt = (x + 0.1 for x in teacher_embeddings(model, b))
    cfg = StepConfig(distill="feature", cd_weight=1.5, ita_weight=ita_weight, kernels="torch")
    got = distillation_loss(model, b["syn_images"], b["syn_tokens"], b["syn_labels"], t_img, t_txt, cfg)
    n = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    with torch.no_grad():
        I, T = n(model.encode_image(b["syn_images"])), n(model.encode_text(b["syn_tokens"]))
    It, Tt = n(t_img), n(t_txt)
    feat = 1.5 * (((It - I) ** 2).sum() / I.numel() + ((Tt - T) ** 2).sum() / T.numel())
    S = 100 * I @ T.T
    k = b["syn_labels"]
    A = (k[:, None] == k[None, :]).double()
    A = 0.8 * A / A.sum(1, keepdim=True) + 0.2 / len(k)
    soft = lambda z, p: -(p * torch.log_softmax(z, 1)).sum(1).mean()  # noqa: E731
    want = feat + ita_weight * (soft(S, A) + soft(S.T, A))
    torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)


def _old_static_fisher(model, awc, step, batches, t_img, t_txt):
    """The trainer's EWC-V Fisher loop as it was written before GiftStep.fisher_batch (issue 15): its own
    L_kd forward under autocast, backward, gradient reduction and Fisher update."""
    for b in batches:
        step.zero_grad()
        with autocast(b["syn_images"].device, step.cfg.bf16):
            loss = distillation_loss(model, b["syn_images"], b["syn_tokens"], b["syn_labels"], t_img, t_txt,
                                     step.cfg, step.dist)
        loss.backward()
        step.reduce_grads(average=False)
        awc.update_fisher()
    step.zero_grad()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fisher_batch_is_the_old_static_fisher_loop_bit_for_bit(backend):
    base = tiny_clip(torch.float32)
    batches = [batch(torch.float32, seed=s) for s in (1, 2)]
    t_img, t_txt = teacher_embeddings(base, batches[0])
    fishers = []
    for use_step in (False, True):
        model = copy.deepcopy(base)
        awc = AdaptiveWeightConsolidation(model.named_parameters(), fisher="static", backend=backend)
        if awc.owns_grad_buffers:
            awc._flat.configure(block_size=4096)       # fewer interpreted programs (the CPU tests)
        awc.set_anchor()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        step = GiftStep(model, opt, StepConfig(kernels="torch"), awc=awc)   # the AWC's backend is the question
        if use_step:
            for b in batches:
                loss = step.fisher_batch(b["syn_images"], b["syn_tokens"], b["syn_labels"], t_img, t_txt)
                assert loss.dim() == 0 and not loss.requires_grad
        else:
            _old_static_fisher(model, awc, step, batches, t_img, t_txt)
        assert awc.num_fisher_updates == len(batches)
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())    # cleared after the pass
        fishers.append({n: awc.fisher(n).clone() for n in awc.names()})
    for n in fishers[0]:
        assert torch.equal(fishers[0][n], fishers[1][n]), n


def test_distill_backward_is_the_steps_l_kd_half():
    model = tiny_clip()
    b = batch()
    t_img, t_txt = teacher_embeddings(model, b)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    step = GiftStep(model, opt, StepConfig(kernels="torch"))
    loss = step.distill_backward(b["syn_images"], b["syn_tokens"], b["syn_labels"], t_img, t_txt)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    step.zero_grad()
    want = distillation_loss(model, b["syn_images"], b["syn_tokens"], b["syn_labels"], t_img, t_txt, step.cfg)
    want.backward()
    assert torch.equal(loss, want.detach())
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(got[n], p.grad), n
    with pytest.raises(ValueError, match="fisher_batch needs the consolidation"):
        step.fisher_batch(b["syn_images"], b["syn_tokens"], b["syn_labels"], t_img, t_txt)
    none_step = GiftStep(model, opt, StepConfig(distill="none", kernels="torch"))
    with pytest.raises(ValueError, match="no distillation loss"):
        none_step.distill_backward(b["syn_images"], b["syn_tokens"], b["syn_labels"], t_img, t_txt)


def test_step_precision_is_decided_once():
    model = tiny_clip(torch.float32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    assert GiftStep(model, opt, StepConfig(bf16=True)).precision == Precision(torch.device("cpu"), True)
    assert GiftStep(model, opt, StepConfig()).precision == Precision(torch.device("cpu"), False)
    with pytest.raises(ValueError, match="StepConfig.bf16"):
        GiftStep(model, opt, StepConfig(bf16=False), precision=Precision(torch.device("cpu"), True))
    with pytest.raises(ValueError, match="kernels must be one of"):
        StepConfig(kernels="cuda")


def test_the_step_clears_what_the_consolidation_does_not_own():
    """With the Triton AWC the step clears the flat buffers in place (awc.owns_grad_buffers), and still clears
    the gradient of a trainable tensor the consolidation excludes."""
    model = tiny_clip(torch.float32)
    b = batch(torch.float32)
    t_img, t_txt = teacher_embeddings(model, b)
    awc = AdaptiveWeightConsolidation(model.named_parameters(), backend="triton", exclude=("logit_scale", "ln_final.*"))
    assert awc.owns_grad_buffers
    awc._flat.configure(block_size=4096)               # fewer interpreted programs (the CPU tests)
    assert not AdaptiveWeightConsolidation(copy.deepcopy(model).named_parameters(), backend="torch").owns_grad_buffers
    awc.set_anchor()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    step = GiftStep(model, opt, StepConfig(kernels="torch"), awc=awc)
    step(b["images"], b["labels"], b["class_tokens"], b["syn_images"], b["syn_tokens"], b["syn_labels"], t_img, t_txt)
    assert model.ln_final.weight.grad is None                          # excluded: set to None
    owned = list(awc.params.values())
    assert all(p.grad is not None and not p.grad.any() for p in owned)  # the flat views, zeroed in place


def test_the_step_distill_modes_are_the_losses_plus_none():
    assert DISTILL_MODES == LOSS_DISTILL_MODES + ("none",)

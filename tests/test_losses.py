"""The losses' torch backend (the plain PyTorch reference) against an independent float64 evaluation of
docs/METHOD.md's formulas."""
import math
import subprocess
import sys

import pytest
import torch

import gift_fast.awc
import gift_fast.backends as backends
import gift_fast.losses as losses
from gift_fast.losses import feature_distill_loss, gift_distill_loss


def _independent(img_s, txt_s, img_t, txt_t, labels, s, tau, ls, mode):
    """docs/METHOD.md's formulas, written out row by row in float64 (no shared helpers)."""
    def n(x):
        return x / torch.sqrt((x * x).sum(1, keepdim=True))

    I, T, It, Tt = n(img_s), n(txt_s), n(img_t), n(txt_t)
    if mode == "image_only":
        S = s * I @ Tt.T
    elif mode == "text_only":
        S = s * It @ T.T
    else:
        S = s * I @ T.T
    St = s * It @ Tt.T
    B = S.shape[0]

    def ce_rows(Z, P):  # mean_i -sum_k P_ik log softmax(Z_i)_k
        total = 0.0
        for i in range(B):
            z = Z[i]
            lse = z.max() + torch.log(torch.exp(z - z.max()).sum())
            total = total - (P[i] * (z - lse)).sum()
        return total / B

    def softmax_rows(Z):
        e = torch.exp(Z - Z.max(1, keepdim=True).values)
        return e / e.sum(1, keepdim=True)

    if mode == "kl":
        # the authors' kl_divergence(t, s): sum_k q_k (log q_k - log p_k), averaged over rows,
        # q = softmax(S/tau) the student's distribution (the target), p = softmax(S'/tau) the teacher's
        def kl_rows(Z, Zt):
            total = 0.0
            for i in range(B):
                q = torch.exp(Z[i] - Z[i].max()) / torch.exp(Z[i] - Z[i].max()).sum()
                p = torch.exp(Zt[i] - Zt[i].max()) / torch.exp(Zt[i] - Zt[i].max()).sum()
                total = total + (q * (torch.log(q) - torch.log(p))).sum()
            return total / B
        cd_i = tau ** 2 * kl_rows(S / tau, St / tau)
        cd_t = tau ** 2 * kl_rows(S.T / tau, St.T / tau)
    else:
        cd_i = tau ** 2 * ce_rows(S / tau, softmax_rows(St / tau))
        cd_t = tau ** 2 * ce_rows(S.T / tau, softmax_rows(St.T / tau))
    A = torch.zeros(B, B, dtype=torch.float64)
    for i in range(B):
        for j in range(B):
            A[i, j] = float(labels[i] == labels[j])
    A = A / A.sum(1, keepdim=True)
    A = (1 - ls) * A + ls / B
    return cd_i, cd_t, ce_rows(S, A), ce_rows(S.T, A.T)


def _inputs(B, D, dtype=torch.float64, dup=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(4)]
    # the teacher close to the student, as in training
    xs[2] = xs[0] + 0.3 * xs[2]
    xs[3] = xs[1] + 0.3 * xs[3]
    labels = (torch.randint(0, max(1, B // 3), (B,), generator=g) if dup else torch.randperm(B, generator=g))
    return [x.to(dtype) for x in xs], labels


@pytest.mark.parametrize("mode", ["contrastive", "image_only", "text_only", "kl"])
@pytest.mark.parametrize("B,D", [(1, 4), (2, 3), (5, 7), (17, 33)])
@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("dup", [False, True])
def test_reference_matches_method_float64(mode, B, D, ls, dup):
    (img_s, txt_s, img_t, txt_t), labels = _inputs(B, D, dup=dup, seed=B * 31 + D)
    s, tau, wcd, wita = 100.0, 2.0, 1.0, 0.25
    leaves = [x.clone().requires_grad_(True) for x in (img_s, txt_s)]
    total, parts = gift_distill_loss(leaves[0], leaves[1], img_t, txt_t, labels, logit_scale=s, temperature=tau,
                                     label_smoothing=ls, cd_weight=wcd, ita_weight=wita, mode=mode,
                                     return_parts=True)
    assert total.dtype == torch.float64 and total.dim() == 0
    total.backward()

    ind_leaves = [x.clone().requires_grad_(True) for x in (img_s, txt_s)]
    cd_i, cd_t, ita_i, ita_t = _independent(ind_leaves[0], ind_leaves[1], img_t, txt_t, labels, s, tau, ls, mode)
    expected = wcd * (cd_i + cd_t) + wita * (ita_i + ita_t)
    expected.backward()

    torch.testing.assert_close(total, expected.detach(), rtol=1e-10, atol=1e-10)
    for name, value in zip(("cd_image", "cd_text", "ita_image", "ita_text"),
                           (wcd * cd_i, wcd * cd_t, wita * ita_i, wita * ita_t)):
        torch.testing.assert_close(parts[name], value.detach(), rtol=1e-10, atol=1e-10)
    for got, want in zip(leaves, ind_leaves):
        if want.grad is None:  # unused by this mode
            assert got.grad is None
        else:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12)


def test_modes_route_gradients():
    (img_s, txt_s, img_t, txt_t), labels = _inputs(6, 5)
    for mode, img_used, txt_used in (("image_only", True, False), ("text_only", False, True),
                                     ("contrastive", True, True)):
        a, b = img_s.clone().requires_grad_(), txt_s.clone().requires_grad_()
        gift_distill_loss(a, b, img_t, txt_t, labels, mode=mode).backward()
        assert (a.grad is not None) == img_used and (b.grad is not None) == txt_used


def test_identical_student_and_teacher_give_teacher_entropy_and_zero_kl():
    (img_s, txt_s, _, _), labels = _inputs(9, 6)
    kl = gift_distill_loss(img_s, txt_s, img_s, txt_s, labels, ita_weight=0.0, mode="kl")
    assert abs(float(kl)) < 1e-10
    # with CE the value is tau^2 * (H(rows) + H(cols)) of the teacher's softmax(S / tau)
    ce = gift_distill_loss(img_s, txt_s, img_s, txt_s, labels, ita_weight=0.0)
    n = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    S = 100.0 * n(img_s) @ n(txt_s).T / 2.0
    entropy = lambda Z: float(-(torch.softmax(Z, 1) * torch.log_softmax(Z, 1)).sum(1).mean())  # noqa: E731
    want = 4.0 * (entropy(S) + entropy(S.T))
    assert want > 0.1 and float(ce) == pytest.approx(want, rel=1e-10)


def test_gradcheck_float64():
    (img_s, txt_s, img_t, txt_t), labels = _inputs(4, 3, dup=True)
    f = lambda a, b: gift_distill_loss(a, b, img_t, txt_t, labels, logit_scale=5.0)  # noqa: E731
    assert torch.autograd.gradcheck(f, (img_s.requires_grad_(), txt_s.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    (img_s, txt_s, img_t, txt_t), labels = _inputs(13, 24, dup=True)
    # the reference in float64 on the same (rounded) inputs: what is left is the float32
    # computation and one rounding of the gradient to the input dtype
    rounded = [x.to(dtype).double().requires_grad_(True) for x in (img_s, txt_s)]
    ref = gift_distill_loss(rounded[0], rounded[1], img_t.to(dtype).double(), txt_t.to(dtype).double(), labels)
    ref.backward()
    lo = [x.to(dtype).requires_grad_(True) for x in (img_s, txt_s)]
    got = gift_distill_loss(lo[0], lo[1], img_t.to(dtype), txt_t.to(dtype), labels)
    assert got.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)  # computed in float32 for every input dtype
    got.backward()
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    for g, want in zip((lo[0].grad, lo[1].grad), (rounded[0].grad, rounded[1].grad)):
        assert g.dtype == dtype
        scale = float(want.abs().max())
        torch.testing.assert_close(g.double(), want, rtol=2 * ulp, atol=1e-5 * scale)


def test_extreme_scale_is_finite():
    # near-identical rows at s = 100: the softmax must not overflow
    base = torch.randn(1, 16, dtype=torch.float64)
    img = base + 1e-6 * torch.randn(8, 16, dtype=torch.float64)
    txt = base + 1e-6 * torch.randn(8, 16, dtype=torch.float64)
    img = (1e4 * img).requires_grad_()
    loss = gift_distill_loss(img, txt, img.detach(), txt, torch.arange(8))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(img.grad).all()


def test_non_contiguous_inputs():
    (img_s, txt_s, img_t, txt_t), labels = _inputs(7, 10)
    wide = torch.randn(7, 20, dtype=torch.float64)
    wide[:, ::2] = img_s
    a = gift_distill_loss(wide[:, ::2], txt_s, img_t, txt_t, labels)
    b = gift_distill_loss(img_s, txt_s, img_t, txt_t, labels)
    torch.testing.assert_close(a, b)


def test_weights_scale_parts():
    (img_s, txt_s, img_t, txt_t), labels = _inputs(5, 4)
    _, p1 = gift_distill_loss(img_s, txt_s, img_t, txt_t, labels, cd_weight=1.0, ita_weight=1.0, return_parts=True)
    _, p2 = gift_distill_loss(img_s, txt_s, img_t, txt_t, labels, cd_weight=3.0, ita_weight=0.5, return_parts=True)
    torch.testing.assert_close(p2["cd_image"], 3 * p1["cd_image"])
    torch.testing.assert_close(p2["ita_text"], 0.5 * p1["ita_text"])


def test_feature_distill_loss_float64():
    """The authors' F.mse_loss of normalized embeddings: a mean over all B * D elements."""
    (img_s, txt_s, img_t, txt_t), _ = _inputs(6, 5)
    leaves = [x.clone().requires_grad_(True) for x in (img_s, txt_s)]
    total, parts = feature_distill_loss(leaves[0], leaves[1], img_t, txt_t, weight=2.0, return_parts=True)
    total.backward()

    def mse_of_normalized(s, t):
        B, D = s.shape
        acc = 0.0
        for i in range(B):
            ns, nt = s[i] / math.sqrt(float((s[i] ** 2).sum())), t[i] / math.sqrt(float((t[i] ** 2).sum()))
            acc += float(((ns - nt) ** 2).sum())
        return acc / (B * D)

    want_i, want_t = 2.0 * mse_of_normalized(img_s, img_t), 2.0 * mse_of_normalized(txt_s, txt_t)
    assert total.dtype == torch.float64
    assert float(parts["feat_image"]) == pytest.approx(want_i, rel=1e-12)
    assert float(parts["feat_text"]) == pytest.approx(want_t, rel=1e-12)
    assert float(total) == pytest.approx(want_i + want_t, rel=1e-12)
    # gradient: d/ds of weight * mean((n(s) - n(t))^2), through the normalization
    a = img_s.clone().requires_grad_(True)
    (2.0 * ((a / a.norm(dim=1, keepdim=True) - img_t / img_t.norm(dim=1, keepdim=True)) ** 2).sum()
     / a.numel()).backward()
    torch.testing.assert_close(leaves[0].grad, a.grad, rtol=1e-10, atol=1e-12)


def test_kl_is_student_as_target_not_the_contrastive_gradient():
    """mode='kl' is KL(student || teacher) (the authors' direction): its gradient differs from CE's."""
    (img_s, txt_s, img_t, txt_t), labels = _inputs(7, 5, seed=3)
    grads = {}
    for mode in ("kl", "contrastive"):
        a = img_s.clone().requires_grad_(True)
        gift_distill_loss(a, txt_s, img_t, txt_t, labels, ita_weight=0.0, mode=mode).backward()
        grads[mode] = a.grad
    assert not torch.allclose(grads["kl"], grads["contrastive"], rtol=1e-3, atol=1e-6)
    # swapping the roles of student and teacher does not give the same value (the direction matters)
    kl = gift_distill_loss(img_s, txt_s, img_t, txt_t, labels, ita_weight=0.0, mode="kl")
    kl_swapped = gift_distill_loss(img_t, txt_t, img_s, txt_s, labels, ita_weight=0.0, mode="kl")
    assert abs(float(kl) - float(kl_swapped)) > 1e-6


@pytest.mark.parametrize("bad,match", [
    (dict(img_s=torch.randn(4, 3)), "img_s has shape"),
    (dict(txt_t=torch.randn(5, 2)), "txt_t has shape"),
    (dict(img_s=torch.randn(0, 3), txt_s=torch.randn(0, 3), img_t=torch.randn(0, 3), txt_t=torch.randn(0, 3),
          labels=torch.zeros(0, dtype=torch.long)), "B = 0"),
    (dict(labels=torch.arange(4)), r"labels must have shape \[5\]"),
    (dict(labels=torch.zeros(5)), "labels must be integer"),
    (dict(img_s=torch.randn(5)), r"img_s must have shape \[B, D\]"),
    (dict(img_s=torch.ones(5, 3, dtype=torch.long)), "floating-point"),
    (dict(mode="both"), "mode must be one of"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(label_smoothing=1.0), "label_smoothing"),
])
def test_bad_input_names_the_argument(bad, match):
    kwargs = dict(img_s=torch.randn(5, 3), txt_s=torch.randn(5, 3), img_t=torch.randn(5, 3),
                  txt_t=torch.randn(5, 3), labels=torch.arange(5))
    kwargs.update(bad)
    pos = [kwargs.pop(k) for k in ("img_s", "txt_s", "img_t", "txt_t", "labels")]
    with pytest.raises(ValueError, match=match):
        gift_distill_loss(*pos, **kwargs)


def test_one_backend_resolver_for_the_loss_and_the_consolidation(monkeypatch):
    assert losses.resolve_backend is backends.resolve_backend and losses.BACKENDS is backends.BACKENDS
    assert gift_fast.awc.BACKENDS is backends.BACKENDS
    cpu, x = torch.device("cpu"), torch.zeros(2)
    for b in ("torch", "triton"):
        assert backends.resolve_backend(b, x) == b
    assert backends.resolve_backend("auto", x) == "torch" and backends.resolve_backend("auto", cpu) == "torch"
    monkeypatch.setattr(backends, "triton_available", lambda: True)
    assert backends.resolve_backend("auto", "cuda") == "triton"
    assert backends.resolve_backend("auto", [torch.zeros(1, device="meta")]) == "torch"   # not all on CUDA
    monkeypatch.setattr(backends, "triton_available", lambda: False)
    assert backends.resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match=r"--kernels must be one of \('torch', 'triton', 'auto'\), got 'cuda'"):
        backends.resolve_backend("cuda", x, what="--kernels")
    model = torch.nn.Linear(3, 2)
    assert gift_fast.awc.AdaptiveWeightConsolidation(model.named_parameters(), backend="auto").backend == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        gift_fast.awc.AdaptiveWeightConsolidation(model.named_parameters(), backend="cuda")


def test_the_backend_list_imports_without_torch():
    """The CLI offers gift_fast.backends.BACKENDS as --kernels choices: importing it must not import torch."""
    code = "import sys, gift_fast.backends as b; assert 'torch' not in sys.modules, 'torch'; print(b.BACKENDS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "('torch', 'triton', 'auto')"

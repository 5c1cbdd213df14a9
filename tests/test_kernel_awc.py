"""AWC with backend="triton" (flat buckets + fused kernels) against the torch backend.

On the CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py); with
GIFT_FAST_GPU_TESTS=1 the same tests run compiled on CUDA through the `device` fixture.
"""
import os

import pytest
import torch

from gift_fast.awc import AdaptiveWeightConsolidation, foreach_awc_step

LOW = torch.bfloat16
# (block_size, num_warps, segment-reduce block): small blocks make every tensor span
# several blocks and the segment reduction loop; None is the default of the device.
SMALL_BLOCKS = (16, 1, 2)


class Mixed(torch.nn.Module):
    """Odd-sized fp32, bf16 and fp16 tensors (three buckets), tensors never reached by
    backward, one whose gradient is all zero, a frozen one and the excluded ``logit_scale``."""

    def __init__(self):
        super().__init__()
        P = torch.nn.Parameter
        self.vec7 = P(torch.randn(7))
        self.mat = P(torch.randn(13, 5))
        self.one = P(torch.randn(1))
        self.big = P(torch.randn(3, 41))
        self.low_mat = P(torch.randn(9, 11).to(LOW))
        self.low_vec = P(torch.randn(5).to(LOW))
        self.half_vec = P(torch.randn(10).to(torch.float16))
        self.unused = P(torch.randn(6))
        self.unused_low = P(torch.randn(3).to(LOW))
        self.zero = P(torch.randn(2, 3))
        self.frozen = P(torch.randn(4), requires_grad=False)
        self.logit_scale = P(torch.tensor(4.6))

    def forward(self, x):
        s = x.sum(0)
        return (torch.tanh(x @ self.mat.t()).square().sum() + torch.sin(self.vec7 * s[0]).sum()
                + torch.cos(self.big * s[1]).sum() * self.one.sum() + torch.tanh(self.low_mat.float() * s[2]).sum()
                + (self.low_vec.float().square() * s[3]).sum() + torch.sin(self.half_vec.float() * s[4]).sum()
                + 0.0 * self.zero.sum()
                + 0.0 * self.logit_scale + self.frozen.sum())


CONSOLIDATED = ["vec7", "mat", "one", "big", "low_mat", "low_vec", "half_vec", "unused", "unused_low", "zero"]


def _pair(device, **kw):
    """Two identical models: one with the torch-backend AWC, one with the Triton AWC."""
    ref, tri = Mixed().to(device), Mixed().to(device)
    tri.load_state_dict(ref.state_dict())
    block = kw.pop("blocks", None)
    a_ref = AdaptiveWeightConsolidation(ref.named_parameters(), backend="torch", **kw)
    a_tri = AdaptiveWeightConsolidation(tri.named_parameters(), backend="triton", **kw)
    if block is not None:
        a_tri._flat.configure(*block)
    return ref, tri, a_ref, a_tri


def _move(models, step):
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.sin(torch.arange(p.numel(), device=p.device).view_as(p) + step).to(p.dtype))


def _assert_same(a_ref, a_tri, ref, tri, pen_ref, pen_tri, check_fisher=True):
    assert pen_tri.dtype == torch.float32 and pen_tri.dim() == 0
    torch.testing.assert_close(pen_tri, pen_ref, rtol=1e-5, atol=1e-6)
    named_ref, named_tri = dict(ref.named_parameters()), dict(tri.named_parameters())
    for n in CONSOLIDATED:
        g_ref, g_tri = named_ref[n].grad, named_tri[n].grad
        assert g_tri is a_tri._flat.segments[n].grad_view, f"{n}: .grad is not the flat view after step()"
        assert g_tri.dtype == g_ref.dtype
        if g_ref.dtype in (LOW, torch.float16):  # one rounding of (nearly) the same float32 value
            ulp = 2 ** -7 if g_ref.dtype == LOW else 2 ** -10
            torch.testing.assert_close(g_tri.float(), g_ref.float(), rtol=ulp, atol=1e-6)
        else:
            torch.testing.assert_close(g_tri, g_ref, rtol=1e-5, atol=1e-6)
        if check_fisher:
            f = a_tri.fisher(n)
            assert f.dtype == torch.float32 and f.shape == named_tri[n].shape
            torch.testing.assert_close(f, a_ref.fisher(n), rtol=1e-5, atol=1e-9)
            assert torch.isfinite(f).all()


@pytest.mark.parametrize("blocks", [SMALL_BLOCKS, None], ids=["small_blocks", "default_blocks"])
@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_adaptive_matches_reference_over_steps(device, decay, blocks):
    ref, tri, a_ref, a_tri = _pair(device, decay=decay, strength=0.7, blocks=blocks)
    assert a_tri.backend == "triton" and len(a_tri._flat.buckets) == 3  # fp32, bf16, fp16
    assert a_tri.names() == a_ref.names() == CONSOLIDATED
    a_ref.set_anchor()
    a_tri.set_anchor()
    # every way of clearing gradients: the flat fill, in-place zeroing of the views,
    # set_to_none (fresh grads copied back into the buffers, missing ones zeroed there);
    # views; set_to_none comes after a step that left a nonzero penalty gradient behind
    clear = [lambda: a_tri.zero_grad(), lambda: tri.zero_grad(set_to_none=False),
             lambda: tri.zero_grad(set_to_none=True), lambda: a_tri.zero_grad()]
    for step, clear_tri in enumerate(clear):
        x = torch.randn(4, 5, device=device)
        ref.zero_grad(set_to_none=True)
        clear_tri()
        ref(x).backward()
        tri(x).backward()
        pen_ref, pen_tri = a_ref.step(), a_tri.step()
        _assert_same(a_ref, a_tri, ref, tri, pen_ref, pen_tri)
        assert torch.all(a_tri.fisher("zero") == 1e-6)
        if step == 0 or decay == 0:
            assert torch.all(a_tri.fisher("unused") == 1e-6) and torch.all(a_tri.fisher("unused_low") == 1e-6)
        # excluded and frozen tensors: exactly what backward left
        assert tri.frozen.grad is None
        assert float(tri.logit_scale.grad) == 0.0
        _move((ref, tri), step)
    assert float(pen_tri) > 0
    assert a_tri.num_fisher_updates == a_ref.num_fisher_updates == len(clear)


def test_missing_grads_everywhere_still_get_the_penalty_gradient(device):
    ref, tri, a_ref, a_tri = _pair(device, blocks=SMALL_BLOCKS)
    a_ref.set_anchor()
    a_tri.set_anchor()
    for step in range(2):  # the second step must not see the first one's penalty gradient
        _move((ref, tri), step)
        ref.zero_grad(set_to_none=True)
        tri.zero_grad(set_to_none=True)  # no backward at all: every gradient is None
        _assert_same(a_ref, a_tri, ref, tri, a_ref.step(), a_tri.step())
        assert all(torch.all(a_tri.fisher(n) == 1e-6) for n in CONSOLIDATED)


@pytest.mark.parametrize("fisher", ["static", "uniform"])
def test_static_and_uniform_match_reference(device, fisher):
    ref, tri, a_ref, a_tri = _pair(device, fisher=fisher, decay=0.5, blocks=SMALL_BLOCKS)
    a_ref.set_anchor()
    a_tri.set_anchor()
    if fisher == "static":  # EWC-V: F from n synthetic batches before the task, running mean
        for _ in range(3):
            x = torch.randn(3, 5, device=device)
            ref.zero_grad(set_to_none=True)
            a_tri.zero_grad()
            ref(x).backward()
            tri(x).backward()
            a_ref.update_fisher()
            a_tri.update_fisher()
        for n in CONSOLIDATED:
            torch.testing.assert_close(a_tri.fisher(n), a_ref.fisher(n), rtol=1e-5, atol=1e-9)
    frozen_f = {n: a_tri.fisher(n).clone() for n in CONSOLIDATED}
    for step in range(2):
        _move((ref, tri), step)
        x = torch.randn(3, 5, device=device)
        ref.zero_grad(set_to_none=True)
        a_tri.zero_grad()
        ref(x).backward()
        tri(x).backward()
        _assert_same(a_ref, a_tri, ref, tri, a_ref.step(), a_tri.step())
        for n in CONSOLIDATED:  # step() leaves a static or uniform F alone
            assert torch.equal(a_tri.fisher(n), frozen_f[n])


class Exact(torch.nn.Module):
    """Linear losses with dyadic coefficients: every gradient, square and sum is exact in
    float32, so the reference and the kernels see bit-identical gradients and means."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(13, 5))
        self.b = torch.nn.Parameter(torch.randn(7))
        self.s = torch.nn.Parameter(torch.randn(1))
        self.h = torch.nn.Parameter(torch.randn(3, 11).to(LOW))
        self.z = torch.nn.Parameter(torch.randn(4))  # gradient of L_kd all zero

    def loss(self, coefs):
        return sum((p.float() * coefs[n]).sum() for n, p in self.named_parameters())


def _dyadic(model, device, zero=()):
    return {n: (torch.zeros(p.shape) if n in zero else torch.randint(-8, 9, p.shape) / 4).to(device)
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("fisher", ["adaptive", "uniform"])
def test_optimizer_step_moves_weights_exactly_as_reference(device, fisher):
    ref, tri = Exact().to(device), Exact().to(device)
    tri.load_state_dict(ref.state_dict())
    fused = device.type == "cuda"
    opt_tri = torch.optim.AdamW(tri.parameters(), lr=1e-2, weight_decay=0.0, fused=fused)  # built BEFORE the AWC
    state_before = {k: v.clone() for k, v in tri.state_dict().items()}
    a_tri = AdaptiveWeightConsolidation(tri.named_parameters(), fisher=fisher, strength=0.5, backend="triton")
    a_tri._flat.configure(*SMALL_BLOCKS)
    a_ref = AdaptiveWeightConsolidation(ref.named_parameters(), fisher=fisher, strength=0.5, backend="torch")
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0, fused=fused)
    # the flat move keeps the Parameter objects, the state_dict and its values
    sd = tri.state_dict()
    assert list(sd) == list(state_before) and all(torch.equal(sd[k], state_before[k]) for k in sd)
    assert [id(p) for p in opt_tri.param_groups[0]["params"]] == [id(p) for p in tri.parameters()]
    a_ref.set_anchor()
    a_tri.set_anchor()
    for step in range(3):
        kd, ce = _dyadic(ref, device, zero=("z",)), _dyadic(ref, device)
        for model, awc, opt in ((ref, a_ref, opt_ref), (tri, a_tri, opt_tri)):
            opt.zero_grad(set_to_none=model is ref)
            model.loss(kd).backward()
            awc.step()
            model.loss(ce).backward()
            opt.step()
        for (n, p_ref), p_tri in zip(ref.named_parameters(), tri.parameters()):
            if device.type == "cpu":
                # the interpreter rounds like torch on the CPU: identical bits
                assert torch.equal(p_tri, p_ref), f"step {step}: {n} moved differently"
            else:
                # compiled, a*b+c may become one fused multiply-add: the last bit may differ
                torch.testing.assert_close(p_tri, p_ref, rtol=1e-6, atol=1e-7)
    assert p_tri.data_ptr() == a_tri._flat.segments["z"].data_ptr  # still the flat view


def test_state_dict_moves_between_backends(device):
    ref, tri, a_ref, a_tri = _pair(device, decay=0.9, blocks=SMALL_BLOCKS)
    a_ref.set_anchor()
    a_tri.set_anchor()
    x = torch.randn(4, 5, device=device)
    ref(x).backward()
    tri(x).backward()
    a_ref.step()
    a_tri.step()
    s_ref, s_tri = a_ref.state_dict(), a_tri.state_dict()
    assert sorted(s_ref) == sorted(s_tri)
    for k in s_ref:
        torch.testing.assert_close(s_tri[k], s_ref[k], rtol=1e-5, atol=1e-9)
    # reference checkpoint -> Triton AWC on a third model, then one more step on both
    third = Mixed().to(device)
    third.load_state_dict(tri.state_dict())
    a_third = AdaptiveWeightConsolidation(third.named_parameters(), decay=0.9, backend="triton")
    a_third.load_state_dict(s_ref)
    assert a_third.num_fisher_updates == 1
    _move((ref, third), 7)
    ref.zero_grad(set_to_none=True)
    third.zero_grad(set_to_none=True)
    x = torch.randn(4, 5, device=device)
    ref(x).backward()
    third(x).backward()
    _assert_same(a_ref, a_third, ref, third, a_ref.step(), a_third.step())
    # Triton checkpoint -> reference AWC
    back = AdaptiveWeightConsolidation(Mixed().to(device).named_parameters(), decay=0.9, backend="torch")
    back.load_state_dict(a_third.state_dict())
    for n in CONSOLIDATED:
        torch.testing.assert_close(back.fisher(n), a_third.fisher(n))
        torch.testing.assert_close(back.anchor(n), a_third.anchor(n))


def test_replaced_parameter_data_is_taken_back(device):
    ref, tri, a_ref, a_tri = _pair(device, blocks=SMALL_BLOCKS)
    a_ref.set_anchor()
    a_tri.set_anchor()
    with torch.no_grad():  # e.g. a loader that assigns new tensors instead of copying
        for m in (ref, tri):
            m.mat.data = m.mat.data.clone() + 0.5
    x = torch.randn(4, 5, device=device)
    ref(x).backward()
    tri(x).backward()
    _assert_same(a_ref, a_tri, ref, tri, a_ref.step(), a_tri.step())
    assert tri.mat.data_ptr() == a_tri._flat.segments["mat"].data_ptr
    with torch.no_grad():
        tri.mat.data = tri.mat.data.double()
    with pytest.raises(RuntimeError, match="after AWC was built"):
        a_tri.step()


def test_foreach_baseline_matches_reference(device):
    ref, other = Mixed().to(device), Mixed().to(device)
    other.load_state_dict(ref.state_dict())
    a_ref = AdaptiveWeightConsolidation(ref.named_parameters(), decay=0.9, strength=0.7)
    a_ref.set_anchor()
    params = [p for n, p in other.named_parameters() if n in CONSOLIDATED]
    anchors = [p.detach().clone() for p in params]
    fishers = None
    for step in range(2):
        _move((ref, other), step)
        x = torch.randn(4, 5, device=device)
        ref.zero_grad(set_to_none=True)
        other.zero_grad(set_to_none=True)
        ref(x).backward()
        other(x).backward()
        pen_ref = a_ref.step()
        pen, fishers = foreach_awc_step(params, anchors, fishers, strength=0.7, decay=0.9)
        torch.testing.assert_close(pen, pen_ref, rtol=1e-5, atol=1e-6)
        for n, p, f in zip(CONSOLIDATED, params, fishers):
            torch.testing.assert_close(f, a_ref.fisher(n), rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(p.grad.float(), dict(ref.named_parameters())[n].grad.float(),
                                       rtol=2 ** -7 if p.dtype != torch.float32 else 1e-5, atol=1e-6)


def test_ddp_copies_reduced_grads_into_the_views(device, tmp_path):
    """DDP (default gradient_as_bucket_view=False) copies its all-reduced buckets back into
    the existing .grad in place: the flat views survive and nothing is copied by AWC."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(device)
        awc = AdaptiveWeightConsolidation(model.named_parameters(), backend="triton")
        ddp = DDP(model, device_ids=[device.index or 0] if device.type == "cuda" else None)
        awc.set_anchor()
        anchors = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():                       # weights away from the anchor: a non-zero penalty
            for k, p in enumerate(model.parameters()):
                p.add_(0.1 * torch.sin(torch.arange(p.numel(), device=device, dtype=p.dtype).view_as(p) + k))
        awc.zero_grad()
        ddp(torch.randn(4, 5, device=device)).sum().backward()
        views = [s.grad_view for s in awc._flat.segments.values()]
        assert all(p.grad is v for p, v in zip(model.parameters(), views))
        grads = [p.grad.detach().clone() for p in model.parameters()]
        penalty = awc.step()
        want = 0.0
        for p, a, g, v in zip(model.parameters(), anchors, grads, views):   # METHOD.md, strength 1
            f = g.double() ** 2 / (g.double() ** 2).mean()
            d = p.detach().double() - a.double()
            want += float((f * d * d).sum())
            assert p.grad is v
            torch.testing.assert_close(p.grad.double(), g.double() + 2 * f * d, rtol=1e-5, atol=1e-6)
        assert want > 1e-3 and float(penalty) == pytest.approx(want, rel=1e-5)
    finally:
        dist.destroy_process_group()


def test_errors(device, monkeypatch):
    m = Mixed().to(device)
    with pytest.raises(ValueError, match="share memory"):
        base = torch.randn(10, device=device)
        AdaptiveWeightConsolidation([("a", torch.nn.Parameter(base[:6])), ("b", torch.nn.Parameter(base[4:]))],
                                    backend="triton")
    awc = AdaptiveWeightConsolidation(m.named_parameters(), backend="triton")
    with pytest.raises(RuntimeError, match="set_anchor"):
        awc.step()
    static = AdaptiveWeightConsolidation(Mixed().to(device).named_parameters(), fisher="static", backend="triton")
    static.set_anchor()
    with pytest.raises(RuntimeError, match="update_fisher"):
        static.step()
    with pytest.raises(ValueError, match="block_size"):
        awc._flat.configure(block_size=24)
    with pytest.raises(ValueError, match="has shape"):
        awc.load_state_dict({"anchor.mat": torch.zeros(5, 13)})
    if device.type == "cuda":
        return
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA parameters"):
        AdaptiveWeightConsolidation(Mixed().named_parameters(), backend="triton")

"""AWC's torch backend (the plain PyTorch reference) against a direct per-tensor evaluation of
docs/METHOD.md's formulas."""
import pytest
import torch

from gift_fast.awc import AdaptiveWeightConsolidation


class Small(torch.nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.a = torch.nn.Linear(5, 3).to(dtype)
        self.b = torch.nn.Linear(3, 7, bias=True).to(dtype)
        self.unused = torch.nn.Parameter(torch.randn(4, dtype=dtype))  # never gets a grad
        self.zero = torch.nn.Parameter(torch.randn(2, 3, dtype=dtype))  # grad all zero
        self.frozen = torch.nn.Parameter(torch.randn(3, dtype=dtype), requires_grad=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6, dtype=dtype))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).sum() + 0.0 * self.zero.sum() + self.logit_scale * 0 + self.frozen.sum()


def _direct_step(state, named, decay, strength):
    """One AWC step per tensor, written independently: returns penalty, updates state['F'], grads."""
    penalty = 0.0
    for name, p in named:
        if name in ("frozen", "logit_scale"):
            continue
        g = p.grad
        if g is None or float((g.double() ** 2).mean()) == 0.0:
            f_new = torch.full(p.shape, 1e-6, dtype=torch.float64)
        else:
            sq = g.double() ** 2
            f_new = sq / sq.mean()
        F = f_new if name not in state["F"] else decay * state["F"][name] + (1 - decay) * f_new
        state["F"][name] = F
        d = p.detach().double() - state["anchor"][name]
        pen_grad = 2 * strength * F * d
        p.grad = pen_grad.to(p.dtype) if p.grad is None else p.grad + pen_grad.to(p.dtype)
        penalty += strength * float((F * d * d).sum())
    return penalty


@pytest.mark.parametrize("decay", [0.0, 0.9])
@pytest.mark.parametrize("strength", [1.0, 0.3])
def test_matches_direct_evaluation_over_steps(decay, strength):
    torch.manual_seed(1)
    m_ref, m_awc = Small(), Small()
    m_awc.load_state_dict(m_ref.state_dict())
    awc = AdaptiveWeightConsolidation(m_awc.named_parameters(), strength=strength, decay=decay)
    awc.set_anchor()
    state = {"F": {}, "anchor": {n: p.detach().double().clone() for n, p in m_ref.named_parameters()}}
    for step in range(4):
        x = torch.randn(6, 5, dtype=torch.float64)
        for m in (m_ref, m_awc):
            m.zero_grad(set_to_none=True)
            m(x).backward()
        want = _direct_step(state, list(m_ref.named_parameters()), decay, strength)
        got = awc.step()
        assert got.dtype == torch.float32 and got.dim() == 0
        assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-7)
        for (n, p_ref), (_, p) in zip(m_ref.named_parameters(), m_awc.named_parameters()):
            if n == "frozen":
                assert p.grad is None
                continue
            if n == "logit_scale":
                # excluded: its grad is exactly what backward left there
                assert p.grad is not None and float(p.grad) == 0.0
                continue
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(awc.fisher(n).double(), state["F"][n], rtol=1e-5, atol=1e-12)
        # no gradient: F_new = 1e-6, and an average of 1e-6's stays 1e-6 for any decay
        torch.testing.assert_close(awc.fisher("unused"), torch.full((4,), 1e-6, dtype=torch.float32),
                                   rtol=1e-6, atol=0)
        assert not torch.isnan(awc.fisher("zero")).any()
        # move the weights so that the penalty is not zero at the next step
        with torch.no_grad():
            for m in (m_ref, m_awc):
                for n, p in m.named_parameters():
                    if p.requires_grad:
                        p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=p.dtype).view_as(p) + step))
    assert float(got) > 0


def test_zero_and_missing_grads_get_tiny_fisher_and_penalty_gradient():
    m = Small()
    awc = AdaptiveWeightConsolidation(m.named_parameters())
    awc.set_anchor()
    with torch.no_grad():
        m.unused.add_(1.0)
        m.zero.add_(2.0)
    m(torch.randn(2, 5, dtype=torch.float64)).backward()
    awc.step()
    assert torch.all(awc.fisher("unused") == 1e-6)
    assert torch.all(awc.fisher("zero") == 1e-6)
    torch.testing.assert_close(m.unused.grad, torch.full_like(m.unused, 2e-6))
    torch.testing.assert_close(m.zero.grad, torch.full_like(m.zero, 4e-6))


def test_excluded_and_frozen_untouched():
    m = Small()
    awc = AdaptiveWeightConsolidation(m.named_parameters(), exclude=("logit_scale", "b.*"))
    assert "logit_scale" not in awc.names() and "frozen" not in awc.names()
    assert "b.weight" not in awc.names() and "a.weight" in awc.names()


def test_uniform_is_plain_l2_without_grads():
    m = Small()
    awc = AdaptiveWeightConsolidation(m.named_parameters(), fisher="uniform", strength=0.5)
    awc.set_anchor()
    with torch.no_grad():
        m.a.weight.add_(0.1)
    pen = awc.step()
    assert float(pen) == pytest.approx(0.5 * 0.01 * m.a.weight.numel(), rel=1e-5)
    torch.testing.assert_close(m.a.weight.grad, torch.full_like(m.a.weight, 0.1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(m.b.weight.grad, torch.zeros_like(m.b.weight))


def test_static_fisher_is_running_mean_then_frozen():
    m = Small()
    awc = AdaptiveWeightConsolidation(m.named_parameters(), fisher="static")
    awc.set_anchor()
    fs = []
    for _ in range(3):
        m.zero_grad(set_to_none=True)
        m(torch.randn(4, 5, dtype=torch.float64)).backward()
        g = m.a.weight.grad.double() ** 2
        fs.append(g / g.mean())
        awc.update_fisher()
    torch.testing.assert_close(awc.fisher("a.weight").double(), sum(fs) / 3, rtol=1e-5, atol=1e-9)
    frozen = awc.fisher("a.weight").clone()
    m.zero_grad(set_to_none=True)
    m(torch.randn(4, 5, dtype=torch.float64)).backward()
    awc.step()
    torch.testing.assert_close(awc.fisher("a.weight"), frozen)


def test_bf16_parameters():
    torch.manual_seed(3)
    m64, m16 = Small(), Small(torch.bfloat16)
    m16.load_state_dict({k: v.to(torch.bfloat16) for k, v in m64.state_dict().items()})
    m64.load_state_dict({k: v.to(torch.bfloat16).double() for k, v in m64.state_dict().items()})
    a64 = AdaptiveWeightConsolidation(m64.named_parameters())
    a16 = AdaptiveWeightConsolidation(m16.named_parameters())
    a64.set_anchor(); a16.set_anchor()
    with torch.no_grad():
        for m in (m64, m16):
            m.a.weight.add_(0.25)
    for m in (m64, m16):
        for p in m.parameters():
            p.grad = torch.ones_like(p) if p.requires_grad else None
    p64, p16 = a64.step(), a16.step()
    assert float(p16) == pytest.approx(float(p64), rel=1e-2)
    assert a16.fisher("a.weight").dtype == torch.float32
    torch.testing.assert_close(m16.a.weight.grad.double(), m64.a.weight.grad, rtol=1e-2, atol=1e-2)


def test_state_dict_roundtrip():
    """Anchors, Fisher and counter survive: a fresh AWC on a model whose weights have moved since
    the anchor was set takes the same next step as the original."""
    import copy

    torch.manual_seed(4)
    m = Small()
    awc = AdaptiveWeightConsolidation(m.named_parameters(), decay=0.5)
    awc.set_anchor()
    anchors = {n: p.detach().clone() for n, p in m.named_parameters() if n in awc.names()}
    m(torch.randn(2, 5, dtype=torch.float64)).backward()
    awc.step()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1)
    m2 = copy.deepcopy(m)                                  # the moved weights, not the anchors
    other = AdaptiveWeightConsolidation(m2.named_parameters(), decay=0.5)
    other.load_state_dict(awc.state_dict())
    assert other.num_fisher_updates == 1
    for n in awc.names():
        assert torch.equal(other.anchor(n), anchors[n]), n
        assert not torch.equal(other.anchor(n), dict(m2.named_parameters())[n].detach()), n
        torch.testing.assert_close(other.fisher(n), awc.fisher(n), rtol=0, atol=0)
    x = torch.randn(3, 5, dtype=torch.float64)
    for model in (m, m2):
        model.zero_grad(set_to_none=True)
        model(x).backward()
    pen, pen2 = awc.step(), other.step()
    assert float(pen) > 0 and float(pen2) == float(pen)
    for (n, p), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
        if n in awc.names():
            torch.testing.assert_close(p2.grad, p.grad, rtol=0, atol=0, msg=n)
            torch.testing.assert_close(other.fisher(n), awc.fisher(n), rtol=0, atol=0, msg=n)


def test_errors():
    m = Small()
    with pytest.raises(ValueError, match="fisher must be one of"):
        AdaptiveWeightConsolidation(m.named_parameters(), fisher="ewc")
    awc = AdaptiveWeightConsolidation(m.named_parameters())
    with pytest.raises(RuntimeError, match="set_anchor"):
        awc.step()
    static = AdaptiveWeightConsolidation(m.named_parameters(), fisher="static")
    static.set_anchor()
    with pytest.raises(RuntimeError, match="update_fisher"):
        static.step()
    with pytest.raises(KeyError):
        awc.fisher("frozen")

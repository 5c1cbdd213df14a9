"""The fused Triton CD+ITA kernel against the plain PyTorch reference in float64.

On the CPU the kernels run through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); with GIFT_FAST_GPU_TESTS=1 the same tests run compiled on CUDA.
The reference runs in float64 on the very values the kernel sees (inputs rounded to
their dtype first), so the tolerances measure the kernel, not the input rounding.
"""
import os

import pytest
import torch

import gift_fast.kernels.awc as awck
import gift_fast.kernels.contrastive_distill as cdk
from gift_fast.kernels import utils as kernel_utils
from gift_fast.kernels.contrastive_distill import gift_distill_parts_triton
from gift_fast.losses import MODES, TORCH_ONLY_MODES, _gift_distill_parts_torch, gift_distill_loss, resolve_backend

S, TAU, WCD, WITA = 100.0, 2.0, 1.0, 0.25
# gradient tolerance, relative to the largest gradient entry (fp16 at B > 64 runs its gradient
# GEMMs on bf16 operands: fp16's range cannot hold the unnormalized gradient block)
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}
GRAD_TOL_FP16_LARGE = 1e-2
LOSS_RTOL = 2e-5   # the similarity products are exact for every dtype: the loss is fp32-accurate


def _inputs(B, D, dup=False, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(4)]
    xs[2] = xs[0] + spread * xs[2]      # the teacher close to the student, as in training
    xs[3] = xs[1] + spread * xs[3]
    labels = torch.randint(0, max(1, B // 3), (B,), generator=g) if dup else torch.randperm(B, generator=g)
    return xs, labels


def _reference(xs, labels, mode, ls, weights=None, s=S, tau=TAU):
    """Parts and gradients of sum(weights * parts) in float64 (weights default to ones)."""
    leaves = [x.detach().double().cpu().clone().requires_grad_(True) for x in xs[:2]]
    parts = _gift_distill_parts_torch(leaves[0], leaves[1], xs[2].double().cpu(), xs[3].double().cpu(),
                                      labels.cpu(), s, tau, ls, WCD, WITA, mode)
    w = torch.ones(4, dtype=torch.float64) if weights is None else weights.double().cpu()
    (parts * w).sum().backward()
    return parts.detach(), [leaf.grad for leaf in leaves]


def _triton(xs, labels, mode, ls, weights=None, s=S, tau=TAU, **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in xs[:2]]
    parts = gift_distill_parts_triton(leaves[0], leaves[1], xs[2], xs[3], labels, s, tau, ls, WCD, WITA, mode, **kw)
    w = torch.ones(4, device=parts.device) if weights is None else weights.float().to(parts.device)
    (parts * w).sum().backward()
    return parts.detach(), [leaf.grad for leaf in leaves]


def _check(got, want, dtype, what="", large=False):
    got_parts, got_grads = got
    want_parts, want_grads = want
    assert got_parts.dtype == torch.float32 and got_parts.shape == (4,)
    torch.testing.assert_close(got_parts.double().cpu(), want_parts, rtol=LOSS_RTOL, atol=1e-5,
                               msg=lambda m: f"parts {what}: {m}")
    tol = GRAD_TOL_FP16_LARGE if (large and dtype == torch.float16) else GRAD_TOL[dtype]
    for name, g, w in zip(("img_s", "txt_s"), got_grads, want_grads):
        if w is None:
            assert g is None, f"{name} must get no gradient in this mode"
            continue
        assert g is not None and g.dtype == dtype
        scale = w.abs().max().item()
        torch.testing.assert_close(g.double().cpu(), w, rtol=tol, atol=tol * scale + 1e-30,
                                   msg=lambda m: f"grad {name} {what}: {m}")


def _cast(xs, dtype, device):
    """Inputs rounded to dtype on the device, and the same values in float64 for the reference."""
    low = [x.to(dtype).to(device) for x in xs]
    return low, [x.double().cpu() for x in low]


# B <= 64 runs the one-program path, larger B the tiled path; sizes kept small for the interpreter
CASES = [
    # B, D, dtype, mode, duplicate labels, label smoothing
    (1, 8, torch.float32, "contrastive", False, 0.2),
    (2, 64, torch.bfloat16, "image_only", True, 0.0),
    (3, 8, torch.float16, "text_only", True, 0.2),
    (17, 64, torch.float32, "contrastive", True, 0.2),
    (17, 768, torch.bfloat16, "contrastive", True, 0.2),
    (17, 512, torch.float16, "image_only", True, 0.0),
    (64, 512, torch.float32, "contrastive", True, 0.2),
    (64, 512, torch.bfloat16, "contrastive", False, 0.2),
    (64, 64, torch.float16, "text_only", True, 0.2),
    (129, 64, torch.float32, "contrastive", True, 0.2),
    (129, 64, torch.bfloat16, "image_only", True, 0.0),
    (129, 8, torch.float16, "text_only", False, 0.2),
    (300, 8, torch.float32, "contrastive", True, 0.0),
    (300, 8, torch.bfloat16, "contrastive", True, 0.2),
]


@pytest.mark.parametrize("B,D,dtype,mode,dup,ls", CASES,
                         ids=[f"B{c[0]}-D{c[1]}-{str(c[2])[6:]}-{c[3]}-dup{int(c[4])}-ls{c[5]}" for c in CASES])
def test_matches_reference_float64(device, B, D, dtype, mode, dup, ls):
    xs, labels = _inputs(B, D, dup=dup, seed=1000 * B + D)
    low, exact = _cast(xs, dtype, device)
    _check(_triton(low, labels.to(device), mode, ls), _reference(exact, labels, mode, ls), dtype,
           f"B={B} D={D} {dtype} {mode}", large=B > cdk.SMALL_B_MAX)


@pytest.mark.parametrize("mode", ["contrastive", "image_only", "text_only"])
@pytest.mark.parametrize("path", ["small", "large"])
def test_both_paths_every_mode(device, mode, path):
    # the large path with small tiles: several column groups per row block and several
    # gradient chunks, so the partial merges and the chunked accumulation are exercised
    xs, labels = _inputs(60, 40, dup=True, seed=7)
    low, exact = _cast(xs, torch.float32, device)
    kw = dict(_force_path=path)
    if path == "large":
        kw.update(_tiles=(32, 16, 16), _group=2, _chunk_rows=32)
    _check(_triton(low, labels.to(device), mode, 0.2, **kw), _reference(exact, labels, mode, 0.2),
           torch.float32, f"{path} {mode}")


@pytest.mark.parametrize("path", ["small", "large"])
def test_any_weighting_of_the_parts_is_exact(device, path):
    # the backward reads d(loss)/d(parts): backpropagating one part, or a weighted sum, is exact
    xs, labels = _inputs(40, 24, dup=True, seed=3)
    low, exact = _cast(xs, torch.float32, device)
    kw = dict(_force_path=path, _tiles=(32, 32, 16)) if path == "large" else dict(_force_path=path)
    for weights in (torch.tensor([1.0, 2.0, -3.0, 0.5]), torch.tensor([0.0, 0.0, 1.0, 0.0])):
        _check(_triton(low, labels.to(device), "contrastive", 0.2, weights=weights, **kw),
               _reference(exact, labels, "contrastive", 0.2, weights=weights), torch.float32, f"w={weights}")


def test_grad_output_scales_the_gradient(device):
    xs, labels = _inputs(20, 16, dup=True, seed=4)
    low = [x.float().to(device) for x in xs]
    grads = []
    for factor in (1.0, 3.0):
        a, b = (x.clone().requires_grad_(True) for x in low[:2])
        loss = gift_distill_loss(a, b, low[2], low[3], labels.to(device), backend="triton")
        (factor * loss).backward()
        grads.append((a.grad, b.grad))
    for g3, g1 in zip(grads[1], grads[0]):   # (the scale enters before a cancellation: rounding differs)
        torch.testing.assert_close(g3, 3.0 * g1, rtol=1e-5, atol=1e-6 * g1.abs().max().item())


@pytest.mark.parametrize("path", ["small", "large"])
def test_upcast_switch_is_the_only_difference(device, path):
    """fp16 tl.dot is exact under the interpreter (bf16 is not): with fp16 inputs the kernel with
    UPCAST (operands rounded to fp16, multiplied in fp32) equals the kernel with native fp16 dots,
    so UPCAST changes nothing but the interpreter's broken bf16 dot. (On CUDA the same test shows
    the tensor-core path equals the fp32 emulation.)"""
    xs, labels = _inputs(48, 64, dup=True, seed=5)
    low = [x.half().to(device) for x in xs]
    kw = dict(_force_path=path, _tiles=(32, 32, 32)) if path == "large" else dict(_force_path=path)
    native = _triton(low, labels.to(device), "contrastive", 0.2, _upcast=False, **kw)
    emulated = _triton(low, labels.to(device), "contrastive", 0.2, _upcast=True, **kw)
    torch.testing.assert_close(native[0], emulated[0], rtol=1e-6, atol=1e-6)
    # the large path's gradient block is bf16 for fp16 inputs, and the interpreter casts to
    # bf16 by truncation without UPCAST (by rounding with it): a bf16-level difference there
    tol = 1e-2 if path == "large" else 1e-3
    for g_native, g_emulated in zip(native[1], emulated[1]):
        scale = g_emulated.float().abs().max().item()
        torch.testing.assert_close(g_native.float(), g_emulated.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("path", ["small", "large"])
def test_near_identical_rows_at_scale_100(device, path):
    kw = dict(_force_path=path, _tiles=(32, 32, 16)) if path == "large" else dict(_force_path=path)
    g = torch.Generator().manual_seed(11)
    base = torch.randn(1, 16, generator=g, dtype=torch.float64)
    # (1) rows equal to 1e-6: S_ij = 100 everywhere up to 1e-10, below fp32 resolution; the
    # loss is then log(B) per row and must come out exactly that, the gradients finite
    img = 1e4 * (base + 1e-6 * torch.randn(40, 16, generator=g, dtype=torch.float64))
    txt = base + 1e-6 * torch.randn(40, 16, generator=g, dtype=torch.float64)
    xs = [img, txt, img + 1e-3 * torch.randn(40, 16, generator=g, dtype=torch.float64), txt]
    labels = torch.arange(40) % 13
    got_parts, got_grads = _triton([x.float().to(device) for x in xs], labels.to(device), "contrastive", 0.2,
                                   tau=0.5, **kw)
    want_parts, _ = _reference([x.float().double() for x in xs], labels, "contrastive", 0.2, tau=0.5)
    torch.testing.assert_close(got_parts.double().cpu(), want_parts, rtol=LOSS_RTOL, atol=1e-5)
    assert all(torch.isfinite(gr).all() for gr in got_grads)
    # (2) close rows (cosines within ~1e-3, S differences ~ 0.1 while |S| ~ 100): fp32 resolves
    # S to ~1e-5, so the gradient is good to ~1e-4; it must be as good as the fp32 reference's
    xs, labels = _inputs(40, 16, dup=True, seed=12)
    xs = [base + 0.03 * x for x in xs]
    xs[0] = 1e3 * xs[0]
    low, exact = _cast(xs, torch.float32, device)
    got = _triton(low, labels.to(device), "contrastive", 0.2, tau=0.5, **kw)
    want = _reference(exact, labels, "contrastive", 0.2, tau=0.5)
    torch.testing.assert_close(got[0].double().cpu(), want[0], rtol=LOSS_RTOL, atol=1e-5)
    leaves = [x.cpu().clone().requires_grad_(True) for x in low[:2]]
    ref32 = _gift_distill_parts_torch(leaves[0], leaves[1], low[2].cpu(), low[3].cpu(), labels, S, 0.5, 0.2,
                                      WCD, WITA, "contrastive")
    ref32.sum().backward()
    for g, g32, w in zip(got[1], (leaves[0].grad, leaves[1].grad), want[1]):
        err = (g.double().cpu() - w).abs().max().item()
        err32 = (g32.double() - w).abs().max().item()
        assert err <= 3 * err32 + 1e-6 * w.abs().max().item(), (err, err32)


@pytest.mark.parametrize("path", ["small", "large"])
def test_zero_row_and_tiny_norms(device, path):
    # ||x|| < eps: F.normalize divides by eps and its backward skips the projection
    kw = dict(_force_path=path, _tiles=(16, 16, 16)) if path == "large" else dict(_force_path=path)
    xs, labels = _inputs(20, 8, dup=True, seed=13)
    xs[0][3] = 0.0
    xs[1][5] = 1e-14 * xs[1][5]
    low, exact = _cast(xs, torch.float32, device)
    got = _triton(low, labels.to(device), "contrastive", 0.2, **kw)
    want = _reference(exact, labels, "contrastive", 0.2)
    torch.testing.assert_close(got[0].double().cpu(), want[0], rtol=LOSS_RTOL, atol=1e-5)
    for g, w in zip(got[1], want[1]):
        assert torch.isfinite(g).all()
        # rows away from the tiny one are ordinary; the tiny row's gradient is ~1/eps, compare relatively
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=1e-5 * w.abs().median().item())


def test_non_contiguous_inputs(device):
    # strided views (and strided labels) give the same result as contiguous copies: both are
    # checked against the float64 reference with the fp32 tolerance (two GPU runs may differ in
    # the last bits: cuBLAS / accumulation order), and against each other at a few fp32 ulps
    xs, labels = _inputs(30, 12, dup=True, seed=14)
    low = [x.float().to(device) for x in xs]
    wide = torch.zeros(30, 24, device=device)
    wide[:, ::2] = low[0]
    col_major = low[1].t().contiguous().t()          # strides (1, 30)
    views = [wide[:, ::2], col_major, low[2][:, :].t().contiguous().t(), low[3]]
    assert not views[0].is_contiguous() and not views[1].is_contiguous()
    lab_wide = torch.zeros(60, dtype=labels.dtype, device=device)
    lab_wide[::2] = labels.to(device)
    want = _reference([x.double().cpu() for x in low], labels, "contrastive", 0.2)
    for path in ("small", "large"):
        kw = dict(_force_path=path, _tiles=(16, 16, 16)) if path == "large" else dict(_force_path=path)
        a = _triton(views, lab_wide[::2], "contrastive", 0.2, **kw)
        b = _triton(low, labels.to(device), "contrastive", 0.2, **kw)
        _check(a, want, torch.float32, f"strided {path}")
        _check(b, want, torch.float32, f"contiguous {path}")
        torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)
        for ga, gb in zip(a[1], b[1]):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6 * gb.abs().max().item())


@pytest.mark.parametrize("mode", ["contrastive", "text_only"])
@pytest.mark.parametrize("path", ["small", "large"])
def test_total_output_matches_parts(device, path, mode):
    # gift_distill_loss without return_parts takes the kernel's own sum of the parts (a 0-dim
    # output whose gradient is read with stride 0): same value and gradients as the parts path,
    # both within the fp32 tolerance of float64; the teacher gets no gradient even if it asks
    kw = dict(_force_path=path, _tiles=(16, 16, 16), _group=2) if path == "large" else dict(_force_path=path)
    xs, labels = _inputs(37, 24, dup=True, seed=21)
    low, exact = _cast(xs, torch.float32, device)
    want_parts, want_grads = _reference(exact, labels, mode, 0.2)
    teacher = [t.clone().requires_grad_(True) for t in low[2:]]
    leaves = [x.clone().requires_grad_(True) for x in low[:2]]
    total = cdk.gift_distill_loss_triton(leaves[0], leaves[1], teacher[0], teacher[1], labels.to(device), S, TAU,
                                         0.2, WCD, WITA, mode, **kw)
    assert total.shape == () and total.dtype == torch.float32
    (2.5 * total).backward()
    assert teacher[0].grad is None and teacher[1].grad is None
    parts, grads = _triton(low, labels.to(device), mode, 0.2, **kw)
    torch.testing.assert_close(total.detach().double().cpu(), want_parts.sum(), rtol=LOSS_RTOL, atol=1e-5)
    torch.testing.assert_close(total.detach(), parts.sum(), rtol=1e-6, atol=1e-6)
    for leaf, g, w in zip(leaves, grads, want_grads):
        if w is None:
            assert leaf.grad is None and g is None
            continue
        scale = w.abs().max().item()
        tol = GRAD_TOL[torch.float32]
        torch.testing.assert_close(leaf.grad.double().cpu(), 2.5 * w, rtol=tol, atol=2.5 * tol * scale)
        torch.testing.assert_close(leaf.grad, 2.5 * g, rtol=1e-5, atol=1e-6 * scale)


def test_runtime_scalars_as_device_tensors(device):
    xs, labels = _inputs(24, 16, dup=True, seed=15)
    low = [x.float().to(device) for x in xs]
    as_float = _triton(low, labels.to(device), "contrastive", 0.1, s=50.0, tau=1.5)
    as_tensor = _triton(low, labels.to(device), "contrastive", 0.1, s=torch.tensor(50.0, device=device),
                        tau=torch.tensor(1.5, device=device))
    torch.testing.assert_close(as_float[0], as_tensor[0])
    torch.testing.assert_close(as_float[1][0], as_tensor[1][0])
    exact = [x.double() for x in low]
    _check(as_tensor, _reference(exact, labels, "contrastive", 0.1, s=50.0, tau=1.5), torch.float32, "tensors")
    trained = torch.tensor(4.6, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="no gradient to logit_scale"):
        gift_distill_parts_triton(*low, labels.to(device), trained.exp(), 2.0, 0.2, 1.0, 0.25, "contrastive")


def test_mixed_dtypes_int32_labels_and_float64(device):
    xs, labels = _inputs(33, 16, dup=True, seed=16)
    # bf16 student, fp32 teacher: computed in fp32, the gradient comes back in bf16
    mixed = [xs[0].bfloat16().to(device), xs[1].bfloat16().to(device), xs[2].float().to(device),
             xs[3].float().to(device)]
    exact = [x.double().cpu() for x in mixed]
    got = _triton(mixed, labels.int().to(device), "contrastive", 0.2)
    want = _reference(exact, labels, "contrastive", 0.2)
    torch.testing.assert_close(got[0].double().cpu(), want[0], rtol=LOSS_RTOL, atol=1e-5)
    assert got[1][0].dtype == torch.bfloat16
    # float64 inputs run in float32; gift_distill_loss hands back float64
    x64 = [x.to(device) for x in xs]
    a, b = (x.clone().requires_grad_(True) for x in x64[:2])
    total = gift_distill_loss(a, b, x64[2], x64[3], labels.to(device), backend="triton")
    assert total.dtype == torch.float64
    total.backward()
    want64 = _reference(xs, labels, "contrastive", 0.2)
    torch.testing.assert_close(total.cpu(), want64[0].sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad.cpu(), want64[1][0], rtol=1e-4, atol=1e-5 * want64[1][0].abs().max().item())


def test_public_api_backend_triton_and_parts(device):
    xs, labels = _inputs(12, 20, dup=True, seed=17)
    low = [x.float().to(device) for x in xs]
    total, parts = gift_distill_loss(*low, labels.to(device), backend="triton", return_parts=True)
    ref_total, ref_parts = gift_distill_loss(*[x.double() for x in low], labels.to(device), backend="torch",
                                             return_parts=True)
    torch.testing.assert_close(total.double(), ref_total, rtol=LOSS_RTOL, atol=1e-5)
    for k in ref_parts:
        torch.testing.assert_close(parts[k].double(), ref_parts[k], rtol=LOSS_RTOL, atol=1e-5)
    with pytest.raises(ValueError, match="kl"):
        gift_distill_loss(*low, labels.to(device), backend="triton", mode="kl")


def test_auto_backend_picks_torch_on_cpu_and_triton_on_cuda(device, monkeypatch):
    xs, labels = _inputs(6, 5)
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return _gift_distill_parts_torch(*args, **kwargs)

    def spy_total(*args, **kwargs):
        calls.append(1)
        return _gift_distill_parts_torch(*args, **kwargs).sum()

    monkeypatch.setattr(cdk, "gift_distill_parts_triton", spy)
    monkeypatch.setattr(cdk, "gift_distill_loss_triton", spy_total)
    low = [x.float().to(device) for x in xs]
    gift_distill_loss(*low, labels.to(device), backend="auto")
    gift_distill_loss(*low, labels.to(device), backend="auto", return_parts=True)
    assert resolve_backend("auto", low[0]) == ("triton" if device.type == "cuda" else "torch")
    assert len(calls) == (2 if device.type == "cuda" else 0)


def test_intermediate_memory_is_linear_in_B():
    # the large path allocates O(B) statistics and a bounded block of H, never B x B
    cfg = cdk._Config(16384, 512, torch.bfloat16, on_gpu=True, sms=132)
    stats_bytes = (cfg.n_cg + cfg.n_rg) * cdk._N_STATS * 16384 * 4
    h_bytes = cfg.chunk_rows * cfg.ld_h * 2
    fp32_grads = 2 * 16384 * 512 * 4
    assert stats_bytes + fp32_grads <= 128 * 2 ** 20 and h_bytes <= cdk.GRAD_CHUNK_BYTES
    assert cdk._Config(64, 512, torch.bfloat16, on_gpu=True, sms=132).small


# ------------------------------------------------------------------ sm_90 compile check (opt-in)
def _aot_compile_sm90():
    """Compile every kernel variant the GPU runs for sm_90 (no GPU needed: triton's bundled ptxas)
    and print registers / spills. Run as ``python tests/test_kernel_contrastive_distill.py --aot``."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    unit_strides = ()                  # (contiguous inputs: no stride arguments any more)
    aligned = {"D", "ld_h"}            # D = 512: divisible by 16

    def types(dt, scalar_ptrs=False):
        t = {n: f"*{dt}" for n in ("x_ptr", "y_ptr", "xt_ptr", "yt_ptr", "h_ptr", "gx_ptr", "gy_ptr", "g_ptr")}
        t.update({n: "*fp32" for n in ("go_ptr", "io_ptr", "rn_ptr", "part_ptr", "ws_ptr", "u_ptr", "v_ptr")})
        t.update(lab_ptr="*i64", **{n: "fp32" for n in ("scale", "tau_in", "ls", "cdw", "itaw", "inv_B")})
        if scalar_ptrs:
            t.update(scale="*fp32", tau_in="*fp32")
        return t

    def compile_one(name, fn, dt, consts, warps, stages=3):
        consts = dict(consts, **{n: 1 for n in unit_strides if n in fn.arg_names})
        t = types(dt, consts.get("SCALE_PTR", False))
        sig = {n: "constexpr" if n in consts else t.get(n, "i32") for n in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if n not in consts and (sig[n].startswith("*") or n in aligned)}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(k.asm["ptx"])
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
        os.unlink(f.name)
        regs = re.findall(r"Used (\d+) registers", out.stderr)
        spills = re.findall(r"(\d+) bytes spill stores", out.stderr)
        print(f"{name:60s} shared={k.metadata.shared:6d} regs={regs} spill_stores={spills}", flush=True)

    for tdt in (torch.bfloat16, torch.float16, torch.float32):
        dt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[tdt]
        for B in (8, 17, 33):
            cfg = cdk._Config(B, 512, tdt, True, 132)
            for grad, ndx, ndy in ((False, False, False), (True, True, True), (True, True, False)):
                compile_one(f"small {dt} B={B} grad={grad} dx={ndx} dy={ndy}", cdk._small_kernel, dt,
                            dict(SCALE_PTR=False, TAU_PTR=False, GRAD=grad, TOTAL=not grad, NEED_DX=ndx, NEED_DY=ndy, BB=cfg.BB,
                                 BK=cfg.BK, UPCAST=False, IEEE=cfg.ieee), cfg.warps)
        cfg = cdk._Config(4096, 512, tdt, True, 132)
        for fn, (bm, bn, bk, w, st) in ((cdk._stats_kernel, (cfg.BM, cfg.BN, cfg.BK, cfg.warps, cfg.stages)),
                                        (cdk._grad_tiles_kernel, (cfg.gBM, cfg.gBN, cfg.gBK, cfg.gwarps,
                                                                  cfg.gstages))):
            compile_one(f"{fn.__name__} {dt} {bm}x{bn}x{bk} w{w} s{st}", fn, dt,
                        dict(SCALE_PTR=False, TAU_PTR=False, BM=bm, BN=bn, BK=bk, UPCAST=False, IEEE=cfg.ieee), w, st)
        compile_one(f"_rnorm_kernel {dt}", cdk._rnorm_kernel, dt, dict(BR=32, BK=64), 4)
        compile_one(f"_finish_kernel {dt}", cdk._finish_kernel, dt, dict(NEED_DX=True, BR=16, BK=64, UPCAST=False), 4)
    compile_one("_combine_kernel", cdk._combine_kernel, "fp32", dict(TAU_PTR=False, BC=256), 4)
    compile_one("small bf16 scale and tau as pointers", cdk._small_kernel, "bf16",
                dict(SCALE_PTR=True, TAU_PTR=True, GRAD=True, TOTAL=False, NEED_DX=True, NEED_DY=True, BB=64, BK=32,
                     UPCAST=False, IEEE=False), 16)


@pytest.mark.skipif(os.environ.get("GIFT_FAST_AOT_CHECK") != "1",
                    reason="compiles every kernel for sm_90 without a GPU (~1 min): set GIFT_FAST_AOT_CHECK=1")
def test_kernels_compile_for_sm90():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, "--aot"], env=env, capture_output=True, text=True)
    print(run.stdout)
    assert run.returncode == 0, run.stderr[-4000:]


def test_the_kernel_modes_are_the_losses_modes_it_computes():
    """The kernel keeps its own MODES (kernels/ import nothing from gift_fast): it must stay gift_fast.losses.MODES
    without the torch-only ones, in the same order and with the same meaning, so the two lists cannot drift."""
    assert cdk.MODES == tuple(m for m in MODES if m not in TORCH_ONLY_MODES)
    assert set(TORCH_ONLY_MODES) <= set(MODES)


def test_one_interpreter_check_for_every_kernel(monkeypatch):
    assert cdk.interpreting is kernel_utils.interpreting and awck.interpreting is kernel_utils.interpreting
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "1")
    assert kernel_utils.interpreting()
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    assert not kernel_utils.interpreting()


if __name__ == "__main__":
    import sys

    if "--aot" in sys.argv:
        _aot_compile_sm90()

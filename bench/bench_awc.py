"""AWC step (Fisher update + penalty gradient + penalty) on CLIP's parameter shapes.

Variants, timed in the same process on the same shapes (float32 parameters, as trained):
  triton   AdaptiveWeightConsolidation(backend="triton"): flat buckets, fused kernels
  loop     the torch backend (the plain PyTorch reference): the per-tensor loop the authors' code runs
  foreach  gift_fast.awc.foreach_awc_step: torch._foreach ops (one host sync per step)
Models: ViT-B/16 (149.6 M parameters) and ViT-L/14 (427.6 M), shapes from open_clip's
configs (see ``clip_param_shapes``; checked against open_clip when it imports).

The device-to-device copy bandwidth is measured in the same run; each result records
the bytes it must move and that rate as a fraction of the copy bandwidth. Bytes per fp32
parameter: 28 (bench/RESULTS.md's floor: read g twice, p, theta*, F; write F and g) when
F is a running estimate (decay > 0); 24 with decay = 0, AdaptiveWeightConsolidation's default, where the
old F is not read. Times are triton.testing.do_bench medians (CUDA events, L2 flushed);
the tensors (GBs) are far larger than L2 anyway.

Run on the GPU (about 40 s on an H200):
    python -P -m pytest bench/bench_awc.py --benchmark-json=bench/awc.json
CPU smoke run of the same code on a tiny shape list (Triton through the interpreter):
    GIFT_FAST_BENCH_CPU=1 python -m pytest bench/bench_awc.py -q
"""
import gc
import os
import time

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # the CPU smoke run: Triton through the interpreter (before triton imports)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gift_fast.awc import AdaptiveWeightConsolidation, foreach_awc_step  # noqa: E402
from gift_fast.versions import package_versions  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
BYTES_PER_PARAM = {True: 28, False: 24}  # keyed by "the old F is read" (decay > 0)

# open_clip model configs (open_clip/model_configs/<name>.json): the fields that set shapes
CLIP_CONFIGS = {
    "ViT-B-16": dict(embed_dim=512, vision_width=768, vision_layers=12, patch_size=16, image_size=224,
                     text_width=512, text_layers=12, context_length=77, vocab_size=49408),
    "ViT-L-14": dict(embed_dim=768, vision_width=1024, vision_layers=24, patch_size=14, image_size=224,
                     text_width=768, text_layers=12, context_length=77, vocab_size=49408),
}


def clip_param_shapes(name):
    """``[(param_name, shape)]`` of ``open_clip.create_model(name)``, in its order."""
    c = CLIP_CONFIGS[name]
    vw, tw, e = c["vision_width"], c["text_width"], c["embed_dim"]
    grid = c["image_size"] // c["patch_size"]

    def blocks(prefix, w, layers):
        out = []
        for i in range(layers):
            b = f"{prefix}.resblocks.{i}."
            out += [(b + "ln_1.weight", (w,)), (b + "ln_1.bias", (w,)),
                    (b + "attn.in_proj_weight", (3 * w, w)), (b + "attn.in_proj_bias", (3 * w,)),
                    (b + "attn.out_proj.weight", (w, w)), (b + "attn.out_proj.bias", (w,)),
                    (b + "ln_2.weight", (w,)), (b + "ln_2.bias", (w,)),
                    (b + "mlp.c_fc.weight", (4 * w, w)), (b + "mlp.c_fc.bias", (4 * w,)),
                    (b + "mlp.c_proj.weight", (w, 4 * w)), (b + "mlp.c_proj.bias", (w,))]
        return out

    return ([("positional_embedding", (c["context_length"], tw)), ("text_projection", (tw, e)), ("logit_scale", ()),
             ("visual.class_embedding", (vw,)), ("visual.positional_embedding", (grid * grid + 1, vw)),
             ("visual.proj", (vw, e)), ("visual.conv1.weight", (vw, 3, c["patch_size"], c["patch_size"])),
             ("visual.ln_pre.weight", (vw,)), ("visual.ln_pre.bias", (vw,))]
            + blocks("visual.transformer", vw, c["vision_layers"])
            + [("visual.ln_post.weight", (vw,)), ("visual.ln_post.bias", (vw,))]
            + blocks("transformer", tw, c["text_layers"])
            + [("token_embedding.weight", (c["vocab_size"], tw)), ("ln_final.weight", (tw,)), ("ln_final.bias", (tw,))])


# the CPU smoke run: a few odd shapes instead of CLIP's
SMOKE_SHAPES = [("a.weight", (37, 11)), ("a.bias", (37,)), ("logit_scale", ()), ("b.weight", (5, 3, 4, 4))]
MODELS = ["ViT-B-16", "ViT-L-14"] if CUDA else ["smoke"]


def _shapes(model):
    return SMOKE_SHAPES if model == "smoke" else clip_param_shapes(model)


def _num_consolidated(model):
    return sum(torch.Size(s).numel() for n, s in _shapes(model) if n != "logit_scale")


def _make_state(model, seed=0):
    """Parameters with gradients and a moved anchor: (named params, list of params)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    named = []
    for n, shape in _shapes(model):
        p = torch.nn.Parameter(0.02 * torch.randn(shape, device=DEVICE, generator=gen))
        p.grad = torch.randn(shape, device=DEVICE, generator=gen)
        named.append((n, p))
    return named


@torch.no_grad()
def _move(named, seed=1):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    for n, p in named:
        p.add_(1e-3 * torch.randn(p.shape, device=DEVICE, generator=gen))


def _time_ms(fn):
    fn()
    if CUDA:
        import triton.testing
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _host_us(fn, n=20):
    """Host time of one call (no sync): what the Python side costs per step."""
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
        if CUDA:
            torch.cuda.synchronize()
    return sorted(ts)[len(ts) // 2] * 1e6


def _synced(fn):
    def run():
        fn()
        if CUDA:
            torch.cuda.synchronize()
    return run


def _free():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def copy_bandwidth():
    """Device-to-device copy of 1 GiB: bytes read + written per second (the roofline)."""
    if not CUDA:
        return float("nan")
    n = 2 ** 28
    src = torch.randn(n, device=DEVICE)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    del src, dst
    _free()
    return 2 * n * 4 / (ms * 1e-3)


def _record(benchmark, *, model, variant, ms, bytes_per_param, copy_bw, host_us, **extra):
    n = _num_consolidated(model)
    bw = bytes_per_param * n / (ms * 1e-3)
    benchmark.extra_info.update(dict(model=model, variant=variant, params=n, median_ms=round(ms, 4),
                                     bytes_per_param=bytes_per_param, achieved_TBps=round(bw / 1e12, 3),
                                     copy_TBps=round(copy_bw / 1e12, 3), fraction_of_copy=round(bw / copy_bw, 3),
                                     host_us_per_call=round(host_us, 1), device=str(DEVICE),
                                     gpu=torch.cuda.get_device_name() if CUDA else "cpu",
                                     **package_versions(["torch"], python=False), **extra))
    print(f"\n{model} {variant}: {ms:.3f} ms, {bw / 1e12:.2f} TB/s = {bw / copy_bw:.2f} of copy, host {host_us:.0f} us")


def _rounds(ms):
    return max(3, min(50, int(1000 / max(ms, 1e-3))))


@pytest.mark.parametrize("model", MODELS)
def test_triton_matches_loop_on_clip_shapes(model):
    """Correctness on the real shapes before any timing: one step of each, from the same state."""
    named_t, named_l = _make_state(model), _make_state(model)
    tri = AdaptiveWeightConsolidation(named_t, decay=0.9, backend="triton")
    ref = AdaptiveWeightConsolidation(named_l, decay=0.9, backend="torch")
    for awc, named in ((tri, named_t), (ref, named_l)):
        awc.set_anchor()
        _move(named)
    for _ in range(2):  # the second step runs the EMA
        pen_t, pen_l = tri.step(), ref.step()
        torch.testing.assert_close(pen_t, pen_l, rtol=1e-4, atol=0)
    for (n, p_t), (_, p_l) in zip(named_t, named_l):
        if n == "logit_scale":
            continue
        torch.testing.assert_close(tri.fisher(n), ref.fisher(n), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p_t.grad, p_l.grad, rtol=1e-5, atol=1e-6)
    del tri, ref, named_t, named_l
    _free()


@pytest.mark.parametrize("decay", [0.0, 0.9])
@pytest.mark.parametrize("variant", ["triton", "loop", "foreach"])
@pytest.mark.parametrize("model", MODELS)
def test_awc_step(benchmark, copy_bandwidth, model, variant, decay):
    if variant != "triton" and decay != 0.0:
        pytest.skip("the baselines are timed at the default decay = 0")
    named = _make_state(model)
    if variant == "foreach":
        params = [p for n, p in named if n != "logit_scale"]
        anchors = [p.detach().clone() for p in params]
        _move(named)
        state = {"fishers": None}

        def fn():
            _, state["fishers"] = foreach_awc_step(params, anchors, state["fishers"], decay=decay)
    else:
        awc = AdaptiveWeightConsolidation(named, decay=decay, backend="triton" if variant == "triton" else "torch")
        awc.set_anchor()
        _move(named)
        fn = awc.step
    fn()  # compile / first F
    ms = _time_ms(fn)
    host = _host_us(fn, n=5 if ms > 20 else 20)
    extra = {}
    if variant == "triton":
        extra = dict(block_size=awc._flat.block_size, num_warps=awc._flat.num_warps,
                     buckets=len(awc._flat.buckets), blocks=sum(b.num_blocks for b in awc._flat.buckets))
    _record(benchmark, model=model, variant=variant, ms=ms, bytes_per_param=BYTES_PER_PARAM[decay > 0],
            copy_bw=copy_bandwidth, host_us=host, decay=decay, **extra)
    benchmark.pedantic(_synced(fn), rounds=_rounds(ms), iterations=1, warmup_rounds=1)
    del named, fn
    _free()


@pytest.mark.parametrize("config", [(1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8)],
                         ids=lambda c: f"block{c[0]}_warps{c[1]}")
def test_triton_launch_config(benchmark, copy_bandwidth, config):
    """A small sweep of the elementwise launch configuration on the first model (decay 0.9)."""
    model = MODELS[0]
    if not CUDA and config[0] > 1024:
        pytest.skip("the CPU smoke run checks one configuration")
    named = _make_state(model)
    awc = AdaptiveWeightConsolidation(named, decay=0.9, backend="triton")
    awc._flat.configure(*config)
    awc.set_anchor()
    _move(named)
    awc.step()
    ms = _time_ms(awc.step)
    _record(benchmark, model=model, variant="triton_config", ms=ms, bytes_per_param=28, copy_bw=copy_bandwidth,
            host_us=_host_us(awc.step), block_size=config[0], num_warps=config[1], decay=0.9)
    benchmark.pedantic(_synced(awc.step), rounds=_rounds(ms), iterations=1, warmup_rounds=1)
    del awc, named
    _free()


def test_shapes_are_open_clips():
    """The hard-coded shape lists equal open_clip's models (a structural check: CPU smoke run only)."""
    if CUDA:
        pytest.skip("checked in the CPU smoke run (building the models on 'meta' takes ~20 s)")
    open_clip = pytest.importorskip("open_clip")
    for name in CLIP_CONFIGS:
        model = open_clip.create_model(name, device="meta")
        assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == clip_param_shapes(name)
    assert _num_consolidated("ViT-B-16") + 1 == 149_620_737

"""CD+ITA loss, forward + backward: the fused Triton kernel against the plain PyTorch reference.

Variants: ``triton`` (gift_distill_loss(backend="triton")), ``eager`` (the torch backend) and
``compiled`` (torch.compile of the torch backend, dynamic=False), at B in {64, 256, 1024, 4096,
16384}, D = 512, bf16 inputs (what training feeds); fp32 inputs at two sizes. These time
back-to-back calls with CUDA events, so a slow host's Python / launch overhead is included.
``triton_graph`` and ``compiled_graph`` capture the same forward + backward (gradients into
static buffers) in one CUDA graph per input set and time its replays: the GPU-side time, as a
CUDA-graphed training step sees it. Each case first checks the loss and gradients against the
float64 plain PyTorch reference on the same values (a fast wrong kernel fails here, before it is timed; the
graph variants check the outputs of a replay).

Recorded in ``extra_info`` (the numbers for bench/RESULTS.md): ``per_call_ms`` (median over
rounds of CUDA-event time / calls, one call = forward + backward), ``peak_mb`` (max memory
allocated during one call above what was allocated before it: grads included, inputs not),
``max_rel_err_*`` (against float64). Inputs rotate over enough sets to exceed the L2 cache.

    python -P -m pytest bench/bench_contrastive_distill.py --benchmark-json=cd.json
    GIFT_FAST_BENCH_SIZES=64,4096 ...      only these B
    GIFT_FAST_BENCH_FP32=1 ...             also fp32 inputs at B = 64 and 4096 (more compiles)
    GIFT_FAST_BENCH_GRAPH=0 ...            skip the CUDA-graph variants
    GIFT_FAST_BENCH_TUNE=1 ...             also sweep the Triton tile settings at B = 4096, 16384
    GIFT_FAST_BENCH_CPU=1 ...              CPU smoke run (interpreter, tiny sizes; says nothing of speed)
"""
import os
import statistics

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # the CPU smoke run (before triton is imported)

from gift_fast.losses import _gift_distill_parts_torch, gift_distill_loss  # noqa: E402

D = 512 if CUDA else 32
SIZES = [int(b) for b in os.environ.get("GIFT_FAST_BENCH_SIZES", "64,256,1024,4096,16384" if CUDA else "64,96").split(",")]
FP32_SIZES = ([b for b in (64, 4096) if b in SIZES] if os.environ.get("GIFT_FAST_BENCH_FP32") == "1" else []) \
    if CUDA else [64]
GRAPH = CUDA and os.environ.get("GIFT_FAST_BENCH_GRAPH", "1") != "0"
VARIANTS = (("triton", "eager", "compiled") + (("triton_graph", "compiled_graph") if GRAPH else ())) if CUDA \
    else ("triton", "eager")
KW = dict(logit_scale=100.0, temperature=2.0, label_smoothing=0.2, cd_weight=1.0, ita_weight=0.25)
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}
TARGET_ROUND_MS = 25.0
ROUNDS = 5

_compiled = {}


def _torch_backend_loss(img_s, txt_s, img_t, txt_t, labels):
    parts = _gift_distill_parts_torch(img_s, txt_s, img_t, txt_t, labels, KW["logit_scale"], KW["temperature"],
                                      KW["label_smoothing"], KW["cd_weight"], KW["ita_weight"], "contrastive")
    return parts.sum()


def _loss_fn(variant):
    variant = variant.replace("_graph", "")
    if variant == "triton":
        return lambda *a: gift_distill_loss(*a, backend="triton", **KW)
    if variant == "eager":
        return lambda *a: gift_distill_loss(*a, backend="torch", **KW)
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(_torch_backend_loss, dynamic=False)
    return _compiled["fn"]


def _input_sets(B, dtype, device):
    """Enough independent input sets that one pass over them exceeds the L2 cache (50 MB)."""
    per_set = 4 * B * D * torch.empty((), dtype=dtype).element_size()
    n_sets = max(2, min(8, -(-200 * 2 ** 20 // per_set))) if CUDA else 1
    sets = []
    g = torch.Generator(device="cpu").manual_seed(B)
    for _ in range(n_sets):
        xs = [torch.randn(B, D, generator=g) for _ in range(4)]
        xs[2] = xs[0] + 0.3 * xs[2]
        xs[3] = xs[1] + 0.3 * xs[3]
        labels = torch.randint(0, max(1, B // 2), (B,), generator=g)   # duplicate prompts, as in GIFT
        xs = [x.to(device=device, dtype=dtype) for x in xs]
        sets.append((xs[0].requires_grad_(True), xs[1].requires_grad_(True), xs[2], xs[3], labels.to(device)))
    return sets


def _check_against_float64(loss_fn, inputs, dtype, graphed=None):
    """Max errors of the loss and both gradients relative to float64 on the same values
    (graphed: the (graph, static loss) of these inputs, replayed instead of a call)."""
    a, b, img_t, txt_t, labels = inputs
    if graphed is None:
        a.grad = b.grad = None
        loss = loss_fn(a, b, img_t, txt_t, labels)
        loss.backward()
    else:
        graphed[0].replay()
        torch.cuda.synchronize()
        loss = graphed[1]
    ra, rb = (x.detach().double().requires_grad_(True) for x in (a, b))
    ref = _torch_backend_loss(ra, rb, img_t.double(), txt_t.double(), labels)
    ref.backward()
    errs = {"loss": abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-12)}
    for name, got, want in (("grad_img", a.grad, ra.grad), ("grad_txt", b.grad, rb.grad)):
        errs[name] = ((got.double() - want).abs().max() / want.abs().max()).item()
    if graphed is None:
        a.grad = b.grad = None
    return errs


def _capture(loss_fn, inputs):
    """One CUDA graph of forward + backward on these inputs: the gradients land in static
    buffers (a.grad, b.grad, allocated during the capture and rewritten by every replay)."""
    a, b, img_t, txt_t, labels = inputs
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                 # warm-up (compiles, caches) off the capture
        for _ in range(2):
            a.grad = b.grad = None
            loss_fn(a, b, img_t, txt_t, labels).backward()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    a.grad = b.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = loss_fn(a, b, img_t, txt_t, labels)
        loss.backward()
    return graph, loss


def _timed_replays(graphs, n_calls):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(n_calls):
        graphs[i % len(graphs)][0].replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n_calls


def _fwd_bwd(loss_fn, inputs):
    a, b, img_t, txt_t, labels = inputs
    a.grad = b.grad = None          # as zero_grad(set_to_none=True) in training
    loss_fn(a, b, img_t, txt_t, labels).backward()


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _timed_calls(loss_fn, sets, n_calls):
    """Milliseconds per call over n_calls calls (CUDA events; wall clock on the CPU)."""
    if CUDA:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(n_calls):
            _fwd_bwd(loss_fn, sets[i % len(sets)])
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / n_calls
    import time
    t0 = time.perf_counter()
    for i in range(n_calls):
        _fwd_bwd(loss_fn, sets[i % len(sets)])
    return (time.perf_counter() - t0) * 1e3 / n_calls


def _peak_mb(loss_fn, inputs):
    if not CUDA:
        return float("nan")
    _sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _fwd_bwd(loss_fn, inputs)
    _sync()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


CASES = [(v, torch.bfloat16, B) for B in SIZES for v in VARIANTS] + \
        [(v, torch.float32, B) for B in FP32_SIZES for v in ("triton", "eager")]


@pytest.mark.parametrize("variant,dtype,B", CASES, ids=[f"{v}-{str(d)[6:]}-B{b}" for v, d, b in CASES])
def test_contrastive_distill_fwd_bwd(benchmark, variant, dtype, B):
    device = torch.device("cuda" if CUDA else "cpu")
    loss_fn = _loss_fn(variant)
    sets = _input_sets(B, dtype, device)
    benchmark.group = f"contrastive_distill {str(dtype)[6:]} B={B} D={D}"
    if variant.endswith("_graph"):
        _bench_graphed(benchmark, variant, dtype, B, loss_fn, sets)
        return
    errs = _check_against_float64(loss_fn, sets[0], dtype)       # also the warm-up / compile
    for k, v in errs.items():
        benchmark.extra_info[f"max_rel_err_{k}"] = v
    assert errs["loss"] <= 1e-4 and errs["grad_img"] <= TOL[dtype] and errs["grad_txt"] <= TOL[dtype], errs
    _fwd_bwd(loss_fn, sets[-1])
    _sync()
    first = _timed_calls(loss_fn, sets, 2)
    n_calls = max(2, min(400, int(TARGET_ROUND_MS / max(first, 1e-3))))
    per_call = []
    benchmark.pedantic(lambda: per_call.append(_timed_calls(loss_fn, sets, n_calls)), rounds=ROUNDS, iterations=1,
                       warmup_rounds=1)
    peak = _peak_mb(loss_fn, sets[0])
    benchmark.extra_info.update(variant=variant, dtype=str(dtype)[6:], B=B, D=D, calls_per_round=n_calls,
                                per_call_ms=statistics.median(per_call[1:] if len(per_call) > 1 else per_call),
                                per_call_ms_min=min(per_call), peak_mb=peak)
    del sets
    if CUDA:
        torch.cuda.empty_cache()


def _bench_graphed(benchmark, variant, dtype, B, loss_fn, sets):
    _sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    graphs = [_capture(loss_fn, inputs) for inputs in sets]
    errs = _check_against_float64(loss_fn, sets[0], dtype, graphed=graphs[0])
    for k, v in errs.items():
        benchmark.extra_info[f"max_rel_err_{k}"] = v
    assert errs["loss"] <= 1e-4 and errs["grad_img"] <= TOL[dtype] and errs["grad_txt"] <= TOL[dtype], errs
    first = _timed_replays(graphs, 2 * len(graphs))
    n_calls = max(2 * len(graphs), min(2000, int(TARGET_ROUND_MS / max(first, 1e-3))))
    per_call = []
    benchmark.pedantic(lambda: per_call.append(_timed_replays(graphs, n_calls)), rounds=ROUNDS, iterations=1,
                       warmup_rounds=1)
    graph_pool_mb = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 / len(graphs)
    benchmark.extra_info.update(variant=variant, dtype=str(dtype)[6:], B=B, D=D, calls_per_round=n_calls,
                                per_call_ms=statistics.median(per_call[1:] if len(per_call) > 1 else per_call),
                                per_call_ms_min=min(per_call), graph_pool_mb_per_graph=graph_pool_mb)
    for inputs in sets:
        inputs[0].grad = inputs[1].grad = None
    del graphs, sets
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- tile sweep
# (stats tiles, grad tiles) as (BM, BN, BK, num_warps, num_stages); the first is the default
TUNE = [
    ((64, 64, 64, 8, 3), (128, 64, 64, 8, 3)),
    ((128, 64, 64, 8, 3), (128, 64, 64, 8, 3)),
    ((64, 128, 64, 8, 3), (128, 64, 64, 8, 3)),
    ((128, 32, 64, 8, 3), (128, 64, 64, 8, 3)),
    ((64, 64, 32, 4, 3), (128, 64, 64, 8, 3)),
    ((64, 64, 64, 8, 3), (64, 64, 64, 8, 3)),
    ((64, 64, 64, 8, 3), (128, 128, 64, 8, 3)),
    ((64, 64, 64, 8, 3), (64, 128, 64, 8, 3)),
]
TUNE_CASES = [(B, i) for B in (4096, 16384) for i in range(len(TUNE))] \
    if CUDA and os.environ.get("GIFT_FAST_BENCH_TUNE") == "1" else []


@pytest.mark.parametrize("B,i", TUNE_CASES, ids=[f"B{b}-cfg{i}" for b, i in TUNE_CASES])
def test_contrastive_distill_tile_sweep(benchmark, B, i):
    import gift_fast.kernels.contrastive_distill as cdk
    stats_tiles, grad_tiles = TUNE[i]
    saved = dict(cdk.STATS_TILES), dict(cdk.GRAD_TILES)
    cdk.STATS_TILES["lowp"], cdk.GRAD_TILES["lowp"] = stats_tiles, grad_tiles
    cdk._config.cache_clear()
    try:
        loss_fn = _loss_fn("triton")
        sets = _input_sets(B, torch.bfloat16, torch.device("cuda"))
        benchmark.group = f"contrastive_distill tile sweep B={B}"
        errs = _check_against_float64(loss_fn, sets[0], torch.bfloat16)
        assert errs["loss"] <= 1e-4 and errs["grad_img"] <= 1e-2 and errs["grad_txt"] <= 1e-2, errs
        _sync()
        n_calls = max(2, min(50, int(TARGET_ROUND_MS / max(_timed_calls(loss_fn, sets, 2), 1e-3))))
        per_call = []
        benchmark.pedantic(lambda: per_call.append(_timed_calls(loss_fn, sets, n_calls)), rounds=3, iterations=1,
                           warmup_rounds=1)
        benchmark.extra_info.update(B=B, stats_tiles=list(stats_tiles), grad_tiles=list(grad_tiles),
                                    per_call_ms=statistics.median(per_call[1:]), peak_mb=_peak_mb(loss_fn, sets[0]))
        del sets
    finally:
        cdk.STATS_TILES.update(saved[0])
        cdk.GRAD_TILES.update(saved[1])
        cdk._config.cache_clear()

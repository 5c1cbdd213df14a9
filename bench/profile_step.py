"""Where the time of one GIFT step goes: ``torch.profiler`` over the step bench's variants.

    python -P bench/profile_step.py [--variant fast_compiled] [--steps 5] [--out DIR]

Builds the step exactly as ``bench/bench_train_step.py`` does (ViT-B/16 on CUDA, the tiny
model on the CPU as a smoke run), warms it up (compilation included), then profiles
``--steps`` steps and writes to ``--out``:

  profile_<variant>.txt   the top kernels / ops by self device time, and by self CPU time
  profile_<variant>.json  per step: wall, device-busy time, the device time per kernel
                          class (GEMM, attention, Triton, elementwise/other, copies) and the
                          share of the wall the device was idle (host-bound when high)

Why: run 2 measured the compiled step at 106.8 ms against a ~24 ms matmul floor without a
profile; the next change should follow what this prints, not a guess.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from gift_fast.files import atomic_write_text, write_json
from gift_fast.versions import package_versions

HERE = Path(__file__).resolve().parent


def _load_step_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", HERE / "bench_train_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# the @triton.jit kernels of gift_fast.kernels (CD + ITA loss, AWC)
OURS = ("_awc_", "_small_kernel", "_rnorm_kernel", "_stats_kernel", "_combine_kernel", "_grad_tiles_kernel",
        "_finish_kernel")


def kernel_class(name: str) -> str:
    """A device kernel's class, from its name (cuBLAS / cuDNN / flash / Inductor naming)."""
    n = name.lower()
    if any(k in n for k in OURS):
        return "gift-fast kernels"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "cudnn_attn")):
        return "attention"
    if any(k in n for k in ("gemm", "xmma", "cutlass", "nvjet", "matmul", "addmm", "bmm")):
        return "gemm"
    if n.startswith("triton_"):
        return "inductor (compiled fusions)"
    if "memcpy" in n or "memset" in n:
        return "copy"
    return "elementwise/other (eager)"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="fast_compiled",
                    choices=["reference_fp32", "bf16_eager", "fast_eager", "fast_compiled"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be at least 1")

    bench = _load_step_bench()
    cuda = bench.CUDA
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    base = bench._build_model(device)
    batches = bench._batches(base, device)
    model, run = bench._make(args.variant, base, batches, device)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        run(batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=False) as prof:
        t1 = time.perf_counter()
        for i in range(args.steps):
            run(batches[i % len(batches)])
        if cuda:
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t1) * 1e3 / args.steps

    events = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    by_class, busy_us = {}, 0.0
    kernels = []
    if cuda:
        for e in prof.events():
            if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA"):
                dur = e.time_range.end - e.time_range.start
                busy_us += dur
                c = kernel_class(e.name)
                by_class[c] = by_class.get(c, 0.0) + dur
        kernels = sorted(((getattr(e, dev_attr), e.key, e.count) for e in events if getattr(e, dev_attr) > 0),
                         reverse=True)[:40]
    busy_ms = busy_us / 1e3 / args.steps
    summary = {
        "variant": args.variant, "model": bench.MODEL, "steps": args.steps, "warmup_s": warmup_s,
        "wall_ms_per_step": wall_ms, "device_busy_ms_per_step": busy_ms if cuda else None,
        "device_idle_share": (1 - busy_ms / wall_ms) if cuda and wall_ms > 0 else None,
        "device_ms_per_step_by_class": {k: v / 1e3 / args.steps for k, v in sorted(by_class.items())},
        "top_kernels_ms_per_step": [{"name": k, "ms": t / 1e3 / args.steps, "calls_per_step": n / args.steps}
                                    for t, k, n in kernels],
        "gpu": torch.cuda.get_device_name() if cuda else "cpu", **package_versions(["torch"], python=False),
    }
    out = Path(args.out)
    table_dev = events.table(sort_by=dev_attr, row_limit=40) if cuda else ""
    table_cpu = events.table(sort_by="self_cpu_time_total", row_limit=30)
    atomic_write_text(
        out / f"profile_{args.variant}.txt",
        f"{args.variant}: {wall_ms:.2f} ms/step wall over {args.steps} steps\n\n"
        f"== by self device time ==\n{table_dev}\n\n== by self CPU time ==\n{table_cpu}\n")
    write_json(out / f"profile_{args.variant}.json", summary, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "top_kernels_ms_per_step"}, indent=1))
    for row in summary["top_kernels_ms_per_step"][:15]:
        print(f"{row['ms']:8.3f} ms  x{row['calls_per_step']:<5g} {row['name'][:110]}")
    return summary


if __name__ == "__main__":
    main()

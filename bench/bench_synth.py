"""Stable Diffusion synthesis throughput: the authors' way beside gift-fast's path, in images/s and MFU.

The SD-1.5 architecture (UNet, VAE, CLIP ViT-L/14 text tower) is built from its config
with random weights (speed does not depend on the values), 512x512, 25 steps
(DPM-Solver multistep, as the reference below 50 steps), guidance 7.5.

Variants, in this order, one process:
  correctness   fp32, 2 images, 8 steps: gift-fast's loop against diffusers' pipeline __call__
                with the same per-image generators (max / mean |diff| in uint8 levels), and the
                bf16 fast path against that fp32 result (reported, not asserted: random weights)
  reference     the authors' way: StableDiffusionPipeline.__call__, fp16, one image per call
                (default attention processor = SDPA, no safety checker: random weights have none)
  plain_b16/b32 gift-fast's loop, bf16, SDPA, nothing else (no channels_last, no fused QKV,
                default SDPA kernel, no cuDNN autotuning): the "bf16 batch 16 + SDPA" anchor, and
                the CLI's eager default (--sd-compile none) at each batch size
  qkv_nocl_b16/b32  fused QKV without channels_last (eager): which of the two layout choices
                made run 1's fast eager rows slower than plain
  fast_b16/b32  + channels_last UNet/VAE, fused QKV, SDPA kernel picked by timing
  compiled      fast + torch.compile of the UNet (mode default), at the faster eager batch
                size; the compile time is recorded. GIFT_FAST_BENCH_SYNTH_COMPILE=0 skips it,
                =all also compiles the VAE decoder
  engine        synthesize_task end to end with the fastest generator: 48 images written as
                JPEG (quality 75) by background threads while the GPU runs the next batch
  safety_checker  the cost of the pipeline's safety checker (on by default in the CLI, as in the
                reference): SD-1.5's checker architecture (CLIP ViT-L/14 vision tower, random
                weights) on one batch of decoded images, the generator's GPU preprocessing
                included; ms per image and the share it adds to the fastest row's time per image

MFU = images/s x 42.7 TFLOP / 989 TFLOP/s (H200 dense bf16 peak); also given against the
752 TFLOP/s bf16 matmul rate measured on the H200 (bench/RESULTS.md, anchors). FLOPs per image:
UNet forward 803 GFLOP per latent x 2 (guidance) x 25 steps + VAE decode 2.51 TFLOP.

Run on the GPU (about 2 to 2.5 minutes on an H200 with compile, under 1 minute without):
    python -P -m pytest bench/bench_synth.py -q -s --benchmark-json=bench/synth.json
CPU smoke run of the same code (tiny random pipeline, 32x32, 2 steps, no compile; seconds):
    GIFT_FAST_BENCH_CPU=1 python -m pytest bench/bench_synth.py -q -s
Environment: GIFT_FAST_BENCH_SYNTH_COMPILE=0|unet|all (default unet),
GIFT_FAST_BENCH_SYNTH_COMPILE_MODE (default "default"), GIFT_FAST_BENCH_SYNTH_COMPILE_BATCH
(default: the faster eager batch), GIFT_FAST_BENCH_SYNTH_BATCHES (default "16,32"),
GIFT_FAST_BENCH_SYNTH_SUMMARY=path (also write the summary table there, markdown).
"""
import gc
import json
import os
import tempfile
import time

import pytest
import torch

from gift_fast.files import atomic_write_text
from gift_fast.synth.engine import synthesize_task
from gift_fast.synth.generators import StableDiffusionGenerator, random_pipeline
from gift_fast.synth.prompts import imagenet_classnames, sample_prompts
from gift_fast.versions import package_versions

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ARCH = "sd15" if CUDA else "tiny"
SIZE = 512 if CUDA else 32
STEPS = 25 if CUDA else 2
GUIDANCE = 7.5
FLOP_PER_IMAGE = 2 * STEPS * 803e9 + 2.51e12 if CUDA else None  # 42.7e12 at 25 steps
PEAK_BF16 = 989e12          # H100 / H200 SXM dense bf16
MEASURED_MATMUL = 752e12    # bf16 matmul rate measured on the H200 (bench/RESULTS.md, anchors)
BATCHES = [int(b) for b in os.environ.get("GIFT_FAST_BENCH_SYNTH_BATCHES", "16,32" if CUDA else "2").split(",")]
COMPILE = os.environ.get("GIFT_FAST_BENCH_SYNTH_COMPILE", "unet" if CUDA else "0")
COMPILE_MODE = os.environ.get("GIFT_FAST_BENCH_SYNTH_COMPILE_MODE", "default")
REF_IMAGES = 4 if CUDA else 1
TIMED_BATCHES = 2 if CUDA else 1

if not CUDA:
    torch.set_num_threads(1)  # the tiny smoke model: threads only contend

RESULTS = {}   # variant -> dict, for the summary and for later variants (best batch, best generator)
_STATE = {}


def _prompts(n, offset=0):
    try:
        pool = imagenet_classnames()
    except Exception:  # open_clip missing on the machine: any realistic prompts will do
        pool = [f"object number {k}" for k in range(1000)]
    return sample_prompts(pool, n + offset, seed=0, task_index=0)[offset:]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _free():
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def _record(benchmark, variant, images_per_s, **extra):
    info = dict(variant=variant, images_per_s=round(images_per_s, 3), arch=ARCH, size=SIZE, steps=STEPS,
                guidance=GUIDANCE, device=str(DEVICE), gpu=torch.cuda.get_device_name() if CUDA else "cpu",
                **package_versions(["torch"], python=False))
    if FLOP_PER_IMAGE:
        info.update(tflop_per_image=round(FLOP_PER_IMAGE / 1e12, 2),
                    mfu_vs_989=round(images_per_s * FLOP_PER_IMAGE / PEAK_BF16, 4),
                    mfu_vs_752_measured=round(images_per_s * FLOP_PER_IMAGE / MEASURED_MATMUL, 4))
    info.update(extra)
    benchmark.extra_info.update(info)
    RESULTS[variant] = info
    mfu = f", MFU {info['mfu_vs_989']:.1%} of 989 / {info['mfu_vs_752_measured']:.1%} of 752" if FLOP_PER_IMAGE else ""
    print(f"\n[synth] {variant}: {images_per_s:.3f} images/s{mfu} {json.dumps(extra, default=str)}")


def _pipe(dtype):
    key = ("pipe", dtype)
    if key not in _STATE:
        t0 = time.perf_counter()
        _STATE[key] = random_pipeline(ARCH, device=DEVICE, dtype=dtype)
        _sync()
        print(f"\n[synth] built {ARCH} pipeline in {dtype} on {DEVICE} in {time.perf_counter() - t0:.1f} s")
    return _STATE[key]


def _drop_pipe(dtype):
    _STATE.pop(("pipe", dtype), None)
    _free()


def test_correctness_loop_matches_pipeline_fp32():
    """Before timing: on the real architecture and device, gift-fast's loop computes diffusers' function."""
    from diffusers import DPMSolverMultistepScheduler
    steps, prompts, seeds = (8 if CUDA else 2), _prompts(2), [101, 202]
    torch.backends.cudnn.benchmark = False
    pipe = random_pipeline(ARCH, device=DEVICE, dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    ref = pipe(prompts, num_inference_steps=steps, guidance_scale=GUIDANCE, height=SIZE, width=SIZE, output_type="np",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    ref = torch.from_numpy((ref * 255).round().astype("uint8")).int()
    ours32 = StableDiffusionGenerator(pipe, steps=steps, guidance=GUIDANCE, dtype="fp32", scheduler="dpm",
                                      height=SIZE, width=SIZE, channels_last=False, fuse_qkv=False,
                                      sdpa_backend="default").generate_uint8(prompts, seeds).int()
    diff = (ours32 - ref).abs()
    del pipe
    _free()
    fast = StableDiffusionGenerator(random_pipeline(ARCH, device=DEVICE, dtype=torch.bfloat16), steps=steps,
                                    guidance=GUIDANCE, dtype="bf16" if CUDA else "fp32", scheduler="dpm",
                                    height=SIZE, width=SIZE)
    out = fast.generate_uint8(prompts, seeds).int()
    fdiff = (out - ours32).abs().float()
    print(f"\n[synth] correctness: fp32 loop vs diffusers pipeline: max {diff.max().item()} mean "
          f"{diff.float().mean().item():.4f} levels; bf16 fast path vs fp32: mean {fdiff.mean().item():.2f} levels "
          f"(random weights), image std {ours32.float().std().item():.1f}; attention {fast.attention_summary()}")
    RESULTS["correctness"] = dict(fp32_vs_pipeline_max=int(diff.max()), fp32_vs_pipeline_mean=float(diff.float().mean()),
                                  bf16_vs_fp32_mean=float(fdiff.mean()), attention=fast.attention_summary())
    del fast
    _free()
    # the same computation as the pipeline (TF32 convolutions on both sides): rounding only
    assert diff.float().mean() < 0.5 and diff.max() <= (8 if CUDA else 1)
    # bf16 with the timed SDPA kernel, fused QKV, channels_last: a broken kernel would be tens of levels off
    assert fdiff.mean() < 8, f"bf16 fast path is {fdiff.mean():.2f} levels from fp32 on average"


def test_reference_pipeline_fp16_one_image_per_call(benchmark):
    """The authors' way: the diffusers pipeline, fp16, one prompt per call."""
    from diffusers import DPMSolverMultistepScheduler
    torch.backends.cudnn.benchmark = False
    dtype = torch.float16 if CUDA else torch.float32
    pipe = _pipe(dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    prompts = _prompts(REF_IMAGES + 1)
    state = {"k": 0}

    def one():
        k = state["k"]
        state["k"] += 1
        img = pipe(prompts[k % len(prompts)], num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
                   width=SIZE, generator=torch.Generator(DEVICE).manual_seed(k)).images[0]
        _sync()
        return img

    one()  # warm-up
    t0 = time.perf_counter()
    benchmark.pedantic(one, rounds=REF_IMAGES, iterations=1, warmup_rounds=0)
    dt = (time.perf_counter() - t0) / REF_IMAGES
    _record(benchmark, "reference_fp16_b1", 1.0 / dt, seconds_per_image=round(dt, 4),
            attn_processor=type(next(iter(pipe.unet.attn_processors.values()))).__name__)
    _drop_pipe(dtype)


def _time_generator(benchmark, gen, batch, variant, **extra):
    prompts = _prompts(batch * (TIMED_BATCHES + 1))
    state = {"k": 0}

    def one_batch():
        k = state["k"]
        state["k"] += 1
        p = prompts[(k * batch) % len(prompts):][:batch]
        p = p + prompts[:batch - len(p)]
        out = gen.generate_uint8(p, [10_000 * k + j for j in range(batch)])
        _sync()
        return out

    t0 = time.perf_counter()
    one_batch()  # warm-up: SDPA kernel timing, cudnn autotune, compile
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    benchmark.pedantic(one_batch, rounds=TIMED_BATCHES, iterations=1, warmup_rounds=0)
    dt = time.perf_counter() - t0
    ips = batch * TIMED_BATCHES / dt
    _record(benchmark, variant, ips, batch=batch, first_batch_s=round(warm, 2), attention=gen.attention_summary(),
            sdpa_timings_ms=gen.describe()["runtime"]["sdpa_timings_ms"], fused_qkv=gen.fused_qkv,
            channels_last=gen.channels_last, compile=gen.compile, compile_note=gen.compile_note,
            cudnn_benchmark=gen.cudnn_benchmark, **extra)
    return ips


@pytest.mark.parametrize("b", BATCHES)
def test_plain_bf16_sdpa(benchmark, b):
    """Also the CLI's eager default (GeneratorConfig, MEASURED_EAGER); batch 32 was not measured in run 1."""
    torch.backends.cudnn.benchmark = False
    gen = StableDiffusionGenerator(_pipe(torch.bfloat16 if CUDA else torch.float32), steps=STEPS, guidance=GUIDANCE,
                                   height=SIZE, width=SIZE, channels_last=False, fuse_qkv=False,
                                   sdpa_backend="default", safety_checker=False, cudnn_benchmark=False)
    _time_generator(benchmark, gen, b, f"plain_bf16_b{b}")
    # undo the attention set-up of this generator for the next ones (they install their own)
    del gen
    _free()


@pytest.mark.parametrize("b", BATCHES)
def test_fused_qkv_without_channels_last(benchmark, b):
    """Eager, fused QKV, no channels_last (runs before the channels_last generators convert the shared UNet)."""
    torch.backends.cudnn.benchmark = CUDA
    gen = StableDiffusionGenerator(_pipe(torch.bfloat16 if CUDA else torch.float32), steps=STEPS, guidance=GUIDANCE,
                                   height=SIZE, width=SIZE, channels_last=False, fuse_qkv=True,
                                   sdpa_backend="default", safety_checker=False)
    _time_generator(benchmark, gen, b, f"qkv_nocl_b{b}")
    del gen
    _free()


@pytest.mark.parametrize("batch", BATCHES)
def test_fast_eager(benchmark, batch):
    torch.backends.cudnn.benchmark = CUDA
    gen = StableDiffusionGenerator(_pipe(torch.bfloat16 if CUDA else torch.float32), steps=STEPS, guidance=GUIDANCE,
                                   height=SIZE, width=SIZE, safety_checker=False)
    _time_generator(benchmark, gen, batch, f"fast_eager_b{batch}")
    _STATE.setdefault("eager_gens", {})[batch] = gen


def _best_eager_batch():
    eager = {int(k.split("_b")[-1]): v["images_per_s"] for k, v in RESULTS.items() if k.startswith("fast_eager_b")}
    return max(eager, key=eager.get) if eager else BATCHES[0]


@pytest.mark.skipif(COMPILE in ("0", "", "none"), reason="GIFT_FAST_BENCH_SYNTH_COMPILE=0")
def test_fast_compiled(benchmark):
    torch.backends.cudnn.benchmark = CUDA
    batch = int(os.environ.get("GIFT_FAST_BENCH_SYNTH_COMPILE_BATCH", _best_eager_batch()))
    eager = _STATE.get("eager_gens", {})
    sdpa = next(iter(eager.values())).sdpa_backend if eager else "auto"
    _STATE.pop("eager_gens", None)  # the compiled generator shares their modules; keep one alive
    gen = StableDiffusionGenerator(_pipe(torch.bfloat16 if CUDA else torch.float32), steps=STEPS, guidance=GUIDANCE,
                                   height=SIZE, width=SIZE, safety_checker=False, sdpa_backend=sdpa,
                                   compile="all" if COMPILE == "all" else "unet", compile_mode=COMPILE_MODE)
    _time_generator(benchmark, gen, batch, f"compiled_{gen.compile}_b{batch}", compile_mode=COMPILE_MODE)
    _STATE["compiled_gen"] = (gen, batch)


def test_engine_end_to_end_with_jpeg_writing(benchmark):
    """synthesize_task: generation + JPEG encoding/writing on background threads + resume scan."""
    if "compiled_gen" in _STATE:
        gen, batch = _STATE["compiled_gen"]
    else:
        batch = _best_eager_batch()
        gen = StableDiffusionGenerator(_pipe(torch.bfloat16 if CUDA else torch.float32), steps=STEPS,
                                       guidance=GUIDANCE, height=SIZE, width=SIZE, safety_checker=False)
    n = 2 * batch if CUDA else 4
    prompts = _prompts(n)
    with tempfile.TemporaryDirectory() as root:
        state = {"k": 0}

        def run():
            state["k"] += 1
            synthesize_task(gen, f"Bench{state['k']}", prompts, root, seed=state["k"], task_index=0,
                            batch_size=batch, progress=False)
            _sync()

        if "compiled_gen" not in _STATE:
            gen.generate_uint8(prompts[:batch], list(range(batch)))  # warm-up of an eager generator
        t0 = time.perf_counter()
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
        dt = time.perf_counter() - t0
        files = sum(1 for _ in os.scandir(os.path.join(root, "Bench1_Syn")))
    _record(benchmark, "engine_end_to_end", n / dt, batch=batch, images=n, files=files,
            generator=("compiled" if "compiled_gen" in _STATE else "eager"))


# SD-1.5's safety checker: CLIP ViT-L/14 vision tower (safety_checker/config.json of stable-diffusion-v1-5)
SAFETY_VISION = (dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14, hidden_act="quick_gelu") if CUDA else
                 dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      image_size=224, patch_size=32, hidden_act="quick_gelu"))


def test_safety_checker_cost(benchmark):
    """What the default safety checker adds per image (never measured before run 3)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    dtype = torch.bfloat16 if CUDA else torch.float32
    with torch.device(DEVICE):
        checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=SAFETY_VISION, projection_dim=768))
    checker = checker.to(dtype=dtype).eval()
    pipe = _pipe(dtype)
    pipe.safety_checker = checker
    try:
        gen = StableDiffusionGenerator(pipe, steps=STEPS, guidance=GUIDANCE, height=SIZE, width=SIZE,
                                       safety_checker=True)
    finally:
        pipe.safety_checker = None
    assert gen.safety_checker is checker
    batch = _STATE["compiled_gen"][1] if "compiled_gen" in _STATE else _best_eager_batch()
    g = torch.Generator(DEVICE).manual_seed(0)
    images = [(torch.rand(batch, 3, SIZE, SIZE, device=DEVICE, generator=g) * 2 - 1).to(dtype) for _ in range(3)]
    state = {"k": 0}

    def check():
        state["k"] += 1
        flags = gen._safety_flags(images[state["k"] % len(images)])
        _sync()
        return flags

    check()  # warm-up
    t0 = time.perf_counter()
    benchmark.pedantic(check, rounds=TIMED_BATCHES, iterations=1, warmup_rounds=0)
    per_image = (time.perf_counter() - t0) / (TIMED_BATCHES * batch)
    best = max((r["images_per_s"] for k, r in RESULTS.items()
                if "images_per_s" in r and k != "reference_fp16_b1" and not k.startswith("safety")), default=None)
    extra = dict(batch=batch, ms_per_image=round(per_image * 1e3, 3))
    if best:
        extra.update(vs_fastest_row=round(per_image * best, 4),
                     fastest_with_checker_images_per_s=round(1 / (1 / best + per_image), 3))
    info = dict(variant="safety_checker_only", checker_images_per_s=round(1 / per_image, 2), device=str(DEVICE),
                gpu=torch.cuda.get_device_name() if CUDA else "cpu", **package_versions(["torch"], python=False),
                **extra)
    benchmark.extra_info.update(info)
    RESULTS["safety_checker_only"] = info
    print(f"\n[synth] safety checker: {json.dumps(info, default=str)}")
    del gen, checker
    _free()


def test_zz_summary():
    """The table of this run (printed; also written to $GIFT_FAST_BENCH_SYNTH_SUMMARY)."""
    rows = ["| variant | images/s | x reference | MFU (989) | MFU (752 measured) | notes |",
            "| --- | --- | --- | --- | --- | --- |"]
    ref = RESULTS.get("reference_fp16_b1", {}).get("images_per_s")
    for name, r in RESULTS.items():
        if "images_per_s" not in r:
            continue
        notes = {k: r[k] for k in ("batch", "first_batch_s", "attention", "compile") if k in r}
        x = f"{r['images_per_s'] / ref:.2f}" if ref else "-"
        rows.append(f"| {name} | {r['images_per_s']:.3f} | {x} | {r.get('mfu_vs_989', '-')} | "
                    f"{r.get('mfu_vs_752_measured', '-')} | {json.dumps(notes, default=str)} |")
    head = (f"SD synthesis, {ARCH} {SIZE}x{SIZE}, {STEPS} steps, guidance {GUIDANCE}, "
            f"{torch.cuda.get_device_name() if CUDA else 'cpu'}, torch {torch.__version__}")
    if "safety_checker_only" in RESULTS:
        head += f"\nsafety checker: {json.dumps(RESULTS['safety_checker_only'], default=str)}"
    if "correctness" in RESULTS:
        head += f"\ncorrectness: {json.dumps(RESULTS['correctness'], default=str)}"
    table = head + "\n\n" + "\n".join(rows) + "\n"
    print("\n" + table)
    path = os.environ.get("GIFT_FAST_BENCH_SYNTH_SUMMARY")
    if path:
        atomic_write_text(path, table)
    assert RESULTS

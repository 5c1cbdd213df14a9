"""The GIFT training step on ViT-B/16 (random weights of the real architecture):
64 task images + 64 synthetic pairs, 100 class prompts (the configuration of bench/RESULTS.md's targets).

Variants, all through gift_fast.step.GiftStep (the one step the trainer runs):
  reference_fp32  the authors' way: fp32 eager, the teacher re-encodes the synthetic
                  batch every step, the torch losses and per-tensor AWC, AdamW (default impl.)
  bf16_eager      the same under bf16 autocast
  fast_eager      bf16 + teacher embeddings cached per task + Triton loss and AWC + fused AdamW
                  + prompts cut after their end-of-text token (gift_fast.text, exact; once per task)
  fast_compiled   fast_eager + regional torch.compile of the transformer blocks
Prompts end at token 6-20 (the MTIL class prompts end at 10-24, mean 8-17; run 2 drew ends
anywhere in 4-76, which made the cut a no-op: compare the text cut's effect within one run).
Before timing, one step of fast_eager and of reference_fp32 from the same weights must
agree (losses within bf16 tolerance, update directions aligned).

    python -P -m pytest bench/bench_train_step.py -q -s --benchmark-json=train.json
Env: GIFT_FAST_BENCH_MODEL (ViT-B-16), GIFT_FAST_BENCH_STEPS (timed steps, 10),
     GIFT_FAST_BENCH_VARIANTS (comma list).
"""
import copy
import os
import time

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # CPU smoke run only (before triton is imported)

from gift_fast.awc import AdaptiveWeightConsolidation  # noqa: E402
from gift_fast.precision import Precision  # noqa: E402
from gift_fast.step import GiftStep, StepConfig, compile_blocks  # noqa: E402
from gift_fast.text import trim_tokens  # noqa: E402
from gift_fast.versions import package_versions  # noqa: E402

MODEL = os.environ.get("GIFT_FAST_BENCH_MODEL", "ViT-B-16" if CUDA else "tiny")
STEPS = int(os.environ.get("GIFT_FAST_BENCH_STEPS", "10" if CUDA else "1"))
VARIANTS = os.environ.get("GIFT_FAST_BENCH_VARIANTS",
                          "reference_fp32,bf16_eager,fast_eager,fast_compiled" if CUDA else
                          "reference_fp32,fast_eager").split(",")
N_TASK, N_SYN, N_CLASSES = (64, 64, 100) if CUDA else (4, 4, 3)
LR = 1e-5
EOT = 49407


def _build_model(device):
    if MODEL == "tiny":
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
        m = CLIP(embed_dim=8, vision_cfg=CLIPVisionCfg(image_size=32, patch_size=16, width=16, layers=1, head_width=8),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=8, heads=1, layers=1))
    else:
        import open_clip
        m = open_clip.create_model(MODEL, pretrained=None)
    m.logit_scale.requires_grad_(False)
    return m.to(device)


def _tokens(n, ctx, g):
    """Random token ids ending with EOT at a prompt-like position (open_clip pools at argmax id)."""
    t = torch.randint(1, EOT - 1, (n, ctx), generator=g)
    ends = torch.randint(min(6, ctx - 1), min(21, ctx), (n,), generator=g)
    for i, e in enumerate(ends.tolist()):
        t[i, e] = EOT
        t[i, e + 1:] = 0
    return t


def _batches(model, device, n_sets=4):
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    ctx = model.context_length
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_sets):   # several sets so that the timing is not of one cached input
        out.append(dict(images=torch.randn(N_TASK, 3, size, size, generator=g).to(device),
                        labels=torch.randint(0, N_CLASSES, (N_TASK,), generator=g).to(device),
                        class_tokens=_tokens(N_CLASSES, ctx, g).to(device),
                        syn_images=torch.randn(N_SYN, 3, size, size, generator=g).to(device),
                        syn_tokens=_tokens(N_SYN, ctx, g).to(device),
                        syn_labels=torch.randint(0, N_SYN // 2, (N_SYN,), generator=g).to(device)))
    return out


class _TeacherEveryStep:
    """The authors' way: the frozen teacher re-encodes each synthetic batch."""

    def __init__(self, teacher, precision: Precision):
        self.teacher, self.precision = teacher, precision

    def __call__(self, b):
        with torch.no_grad(), self.precision.autocast():
            return self.teacher.encode_image(b["syn_images"]), self.teacher.encode_text(b["syn_tokens"])


class _TeacherCached:
    """Once per task: the synthetic set is fixed, so its teacher embeddings are computed once."""

    def __init__(self, teacher, batches, precision: Precision):
        enc = _TeacherEveryStep(teacher, precision)
        self.cache = {id(b): enc(b) for b in batches}

    def __call__(self, b):
        return self.cache[id(b)]


def _make(variant, base, batches, device):
    model = copy.deepcopy(base)
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    fast = variant.startswith("fast")
    bf16 = variant != "reference_fp32"
    kernels = "triton" if fast else "torch"
    precision = Precision.resolve(device, bf16)   # one precision for the step and the teacher
    awc = AdaptiveWeightConsolidation(model.named_parameters(), backend=kernels)
    awc.set_anchor()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.0, fused=bool(fast and CUDA))
    step = GiftStep(model, opt, StepConfig(bf16=bf16, kernels=kernels), awc=awc, precision=precision)
    teacher_fn = _TeacherCached(teacher, batches, precision) if fast else _TeacherEveryStep(teacher, precision)
    if variant == "fast_compiled":
        compile_blocks(model)

    tokens = {id(b): (b["class_tokens"], b["syn_tokens"]) for b in batches}
    if fast:      # the trainer cuts the prompts once per task (gift_fast.text.trim_tokens)
        tokens = {id(b): (trim_tokens(model, b["class_tokens"]), trim_tokens(model, b["syn_tokens"]))
                  for b in batches}

    def run(b):
        t_img, t_txt = teacher_fn(b)
        class_tokens, syn_tokens = tokens[id(b)]
        return step(b["images"], b["labels"], class_tokens, b["syn_images"], syn_tokens, b["syn_labels"],
                    t_img, t_txt)
    return model, run


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def setup():
    device = torch.device("cuda" if CUDA else "cpu")
    torch.manual_seed(0)
    base = _build_model(device)
    return base, _batches(base, device), device


def test_fast_step_matches_reference(setup):
    """Same start, one step each: losses within bf16 tolerance, the updates aligned."""
    base, batches, device = setup
    ref_model, ref_run = _make("reference_fp32", base, batches, device)
    fast_model, fast_run = _make("fast_eager", base, batches, device)
    out_ref, out_fast = ref_run(batches[0]), fast_run(batches[0])
    for k in out_ref:
        r, f = float(out_ref[k]), float(out_fast[k])
        assert abs(f - r) <= 3e-2 * abs(r) + 1e-3, (k, r, f)
    d_ref = torch.cat([(p - q).flatten() for p, q in zip(ref_model.parameters(), base.parameters())])
    d_fast = torch.cat([(p - q).flatten() for p, q in zip(fast_model.parameters(), base.parameters())])
    cos = float(torch.nn.functional.cosine_similarity(d_ref.double(), d_fast.double(), dim=0))
    assert float(d_fast.abs().max()) <= 2.5 * LR + 1e-7     # Adam's first step moves each weight <= lr
    assert cos > 0.8, cos
    print(f"\ncheck: losses ref {dict((k, round(float(v), 5)) for k, v in out_ref.items())} "
          f"fast {dict((k, round(float(v), 5)) for k, v in out_fast.items())}; update cosine {cos:.4f}")
    del ref_model, fast_model


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, setup, variant):
    base, batches, device = setup
    model, run = _make(variant, base, batches, device)
    _sync()
    t0 = time.perf_counter()
    out = run(batches[0])          # warm-up (and compilation)
    _sync()
    first_s = time.perf_counter() - t0
    for b in batches[1:]:          # more warm-up: a compiled variant settles its shapes
        run(b)
    _sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    per_step = []

    def timed():
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(STEPS):
                run(batches[i % len(batches)])
            end.record()
            end.synchronize()
            per_step.append(start.elapsed_time(end) / STEPS)
        else:
            t = time.perf_counter()
            for i in range(STEPS):
                run(batches[i % len(batches)])
            per_step.append((time.perf_counter() - t) * 1e3 / STEPS)

    benchmark.pedantic(timed, rounds=3, iterations=1)
    benchmark.group = f"GIFT step {MODEL} {N_TASK}+{N_SYN} x{N_CLASSES} classes"
    ms = sorted(per_step)[len(per_step) // 2]
    benchmark.extra_info.update(variant=variant, model=MODEL, step_ms=ms, step_ms_all=per_step,
                                first_step_s=first_s, img_per_s=(N_TASK + N_SYN) * 1e3 / ms,
                                peak_gb=(torch.cuda.max_memory_allocated() / 2 ** 30) if CUDA else None,
                                losses={k: float(v) for k, v in out.items()},
                                gpu=torch.cuda.get_device_name() if CUDA else "cpu",
                                **package_versions(["torch"], python=False))
    print(f"\n{variant}: {ms:.1f} ms/step, first step (incl. compile) {first_s:.1f} s")
    del model, run
    if CUDA:
        torch.cuda.empty_cache()

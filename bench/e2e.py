"""One MTIL task end to end at real sizes on random weights, and the Order I extrapolation.

    python bench/e2e.py [--images 1000] [--steps 1000] [--eval-images 97000] [--json out.json]

Stages, each timed on the GPU:
  1. synthesize  ``--images`` SD-1.5 images (random weights of the real architecture, 512x512,
                 25 steps, guidance 7.5) through gift_fast.synth (JPEGs on disk, as a real run);
  2. train       read them back, the teacher's embeddings of the set (once per task), then
                 ``--steps`` GIFT steps on ViT-B/16 (64 task + 64 synthetic pairs, 100 classes)
                 with the fast path (bf16, Triton loss and AWC, fused AdamW, compiled blocks);
  3. evaluate    zero-shot classifiers (class prompts x templates) and ``--eval-images`` test
                 images through the image encoder (bf16, batch 500).
With smaller ``--images/--steps/--eval-images`` (to fit a short GPU lease) each stage's rate
is measured on what ran, and the per-task and Order I times are extrapolated from those
rates at the real sizes: 1,000 images and 1,000 steps per task, and after each of the 11
tasks (plus the zero-shot row) an evaluation of all 11 test sets (about 97,000 images with
ZSCL's splits). One-off costs (compilation) are counted once. The JSON says which numbers
were measured and which extrapolated.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from gift_fast.awc import AdaptiveWeightConsolidation
from gift_fast.data.mtil import classnames
from gift_fast.files import write_json
from gift_fast.models import OPENAI_MEAN, OPENAI_STD
from gift_fast.precision import Precision
from gift_fast.step import GiftStep, StepConfig, compile_blocks
from gift_fast.synth.engine import synthesize_task
from gift_fast.synth.generators import StableDiffusionGenerator, random_pipeline
from gift_fast.synth.prompts import build_class_pool, imagenet_classnames, sample_prompts
from gift_fast.text import encode_text, trim_tokens
from gift_fast.versions import package_versions

BF16 = Precision(torch.device("cuda"), bf16=True)   # the fast path's precision (the script needs a CUDA device)

# test-set sizes of the 11 MTIL data sets with ZSCL's splits (80/20 seeded where torchvision has none)
MTIL_TEST_IMAGES = {"Aircraft": 3333, "Caltech101": 1736, "CIFAR100": 10000, "DTD": 1880, "EuroSAT": 5400,
                    "Flowers": 6149, "Food": 25250, "MNIST": 10000, "OxfordPet": 3669, "StanfordCars": 8041,
                    "SUN397": 21751}
TEMPLATES_PER_CLASS = 1     # the CLIP templates per data set vary (1 to 18); the E2E counts one per class
REAL_IMAGES, REAL_STEPS, TASKS = 1000, 1000, 11


def sync():
    torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def synthesize(n_images, batch, compile_unet, out_root):
    pipe = random_pipeline("sd15", device="cuda", dtype=torch.bfloat16)
    # channels_last off and the default SDPA kernel: faster in eager in H200 run 1
    gen = StableDiffusionGenerator(pipe, steps=25, guidance=7.5, safety_checker=False, sdpa_backend="default",
                                   channels_last=bool(compile_unet), compile="unet" if compile_unet else False)
    prompts = sample_prompts(build_class_pool(imagenet_classnames(), []), n_images + batch, seed=0, task_index=0)
    # the first batch: warm-up (cuDNN/SDPA choice, compilation), timed apart as a one-off
    _, warm_s = timed(lambda: gen.generate_uint8(prompts[:batch], list(range(batch))))
    _, gen_s = timed(lambda: synthesize_task(gen, "E2E", prompts[batch:], out_root, seed=0, task_index=0,
                                             batch_size=batch, progress=False))
    del gen, pipe
    torch.cuda.empty_cache()
    return {"images": n_images, "warmup_s": warm_s, "seconds": gen_s, "images_per_s": n_images / gen_s,
            "compile": bool(compile_unet)}


def load_synthetic(folder, size=224):
    """JPEGs -> normalized float tensors at CLIP's input size (the reading a real task does)."""
    import csv

    import numpy as np
    from PIL import Image

    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    with open(os.path.join(folder, "image_text.csv")) as f:
        rows = list(csv.DictReader(f))
    arr = np.stack([np.asarray(Image.open(os.path.join(folder, r["image"])).convert("RGB")
                               .resize((size, size), Image.BICUBIC)) for r in rows])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255)
    texts = [r["text"] for r in rows]
    return ((x - mean) / std), texts


def train(syn_x, syn_texts, n_steps):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).cuda()
    model.logit_scale.requires_grad_(False)
    tok = open_clip.get_tokenizer("ViT-B-16")
    teacher = open_clip.create_model("ViT-B-16", pretrained=None).cuda().eval().requires_grad_(False)
    teacher.load_state_dict(model.state_dict())
    distinct = sorted(set(syn_texts))
    ids = {t: i for i, t in enumerate(distinct)}
    syn_labels_all = torch.tensor([ids[t] for t in syn_texts], device="cuda")
    syn_tokens_all = trim_tokens(model, tok(syn_texts)).cuda()     # once per task, as the trainer
    syn_x = syn_x.cuda()

    def teacher_pass():
        with torch.no_grad(), BF16.autocast():
            img = torch.cat([teacher.encode_image(syn_x[i:i + 256]) for i in range(0, len(syn_x), 256)])
            txt = torch.cat([encode_text(teacher, syn_tokens_all[i:i + 256]) for i in range(0, len(syn_x), 256)])
        return img, txt
    (t_img, t_txt), teacher_s = timed(teacher_pass)

    awc = AdaptiveWeightConsolidation(model.named_parameters(), backend="triton")
    awc.set_anchor()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0,
                            fused=True)
    step = GiftStep(model, opt, StepConfig(bf16=True, kernels="triton"), awc=awc, precision=BF16)
    compile_blocks(model)
    class_tokens = trim_tokens(model, tok([f"a photo of a class {i}." for i in range(100)])).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    task_x = torch.randn(512, 3, 224, 224, device="cuda", generator=g)   # stands for the cached task data
    task_y = torch.randint(0, 100, (512,), device="cuda", generator=g)
    n_syn = len(syn_x)

    def one(k):
        ti = torch.randint(0, 512, (64,), device="cuda", generator=g)
        si = torch.randint(0, n_syn, (64,), device="cuda", generator=g)
        return step(task_x[ti], task_y[ti], class_tokens, syn_x[si], syn_tokens_all[si], syn_labels_all[si],
                    t_img[si], t_txt[si])
    _, compile_s = timed(lambda: [one(k) for k in range(3)])     # compilation and warm-up
    out, steps_s = timed(lambda: [one(k) for k in range(n_steps)])
    losses = {k: float(v) for k, v in out[-1].items()}
    if not all(map(lambda v: v == v and abs(v) < float("inf"), losses.values())):
        raise RuntimeError(f"non-finite loss in the E2E run: {losses}")
    return model, tok, {"steps": n_steps, "seconds": steps_s, "step_ms": steps_s * 1e3 / n_steps,
                        "warmup_and_compile_s": compile_s, "teacher_embeddings_s": teacher_s,
                        "teacher_images": n_syn, "last_losses": losses}


def evaluate(model, tok, n_images):
    """Zero-shot classifiers of all 11 data sets + n_images through the image encoder."""
    model.eval()

    def classifiers():
        with torch.no_grad(), BF16.autocast():
            for task in MTIL_TEST_IMAGES:
                names = classnames(task) * TEMPLATES_PER_CLASS
                t = trim_tokens(model, tok([f"a photo of a {c}." for c in names])).cuda()
                torch.nn.functional.normalize(encode_text(model, t).float(), dim=-1)
    _, text_s = timed(classifiers)
    x = torch.randn(500, 3, 224, 224, device="cuda")

    def images():
        with torch.no_grad(), BF16.autocast():
            for _ in range(max(1, n_images // 500)):
                model.encode_image(x)
    images()   # warm-up
    _, img_s = timed(images)
    n = max(1, n_images // 500) * 500
    return {"images": n, "image_seconds": img_s, "images_per_s": n / img_s, "classifier_seconds": text_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=REAL_IMAGES, help="synthetic images to generate")
    p.add_argument("--steps", type=int, default=REAL_STEPS, help="training steps to run")
    p.add_argument("--eval-images", type=int, default=sum(MTIL_TEST_IMAGES.values()))
    p.add_argument("--synth-batch", type=int, default=32)
    p.add_argument("--compile-synth", action="store_true", help="torch.compile the UNet (about a minute)")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/e2e.py needs a CUDA device (it times the real sizes)")
    res = {"gpu": torch.cuda.get_device_name(), **package_versions(["torch"], python=False), "args": vars(a),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        res["synthesize"] = synthesize(a.images, a.synth_batch, a.compile_synth, root)
        print("synthesize:", res["synthesize"], flush=True)
        (syn_x, syn_texts), read_s = timed(lambda: load_synthetic(os.path.join(root, "E2E_Syn")))
        res["read_synthetic_s"] = read_s
    model, tok, res["train"] = train(syn_x, syn_texts, a.steps)
    print("train:", res["train"], flush=True)
    res["evaluate"] = evaluate(model, tok, a.eval_images)
    print("evaluate:", res["evaluate"], flush=True)
    res["measured_wall_s"] = time.perf_counter() - t_all

    # extrapolation to the real sizes from the measured rates
    syn, tr, ev = res["synthesize"], res["train"], res["evaluate"]
    eval_one = sum(MTIL_TEST_IMAGES.values()) / ev["images_per_s"] + ev["classifier_seconds"]
    task = {"synthesize_s": REAL_IMAGES / syn["images_per_s"],
            "read_synthetic_s": read_s * REAL_IMAGES / max(1, syn["images"]),
            "teacher_embeddings_s": tr["teacher_embeddings_s"] * REAL_IMAGES / max(1, tr["teacher_images"]),
            "train_s": REAL_STEPS * tr["step_ms"] / 1e3,
            "evaluate_all_11_s": eval_one}
    task["total_s"] = sum(task.values())
    one_off = syn["warmup_s"] + tr["warmup_and_compile_s"]
    order1 = TASKS * task["total_s"] + eval_one + one_off      # + the zero-shot row's evaluation
    res["extrapolated"] = {"per_task": task, "one_off_s": one_off, "order_I_s": order1,
                           "order_I_min": order1 / 60, "target_min": 30,
                           "measured_sizes": {"images": syn["images"], "steps": tr["steps"],
                                              "eval_images": ev["images"]}}
    print(json.dumps(res["extrapolated"], indent=1))
    if a.json:
        write_json(a.json, res, indent=1)


if __name__ == "__main__":
    main()

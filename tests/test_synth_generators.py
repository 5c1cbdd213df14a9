"""StableDiffusionGenerator on the tiny random pipeline: same function as diffusers' pipeline, batch-independent."""
import json
import os

import numpy as np
import pytest
import torch

from gift_fast.synth.generators import (StableDiffusionGenerator, resolve_dtype, tiny_pipeline, tiny_sd_tokenizer,
                                        xformers_cuda_works)

PROMPTS = ["a photo of a tench.", "a photo of a goldfish.", "a photo of a tench.", "a photo of a wok."]
SEEDS = [11, 12, 13, 2 ** 62 + 5]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny convolutions: more threads only contend on a shared CI machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pipeline_reference(steps, guidance, prompts=PROMPTS, seeds=SEEDS, scheduler_cls=None):
    """diffusers' own StableDiffusionPipeline.__call__ (float32, one CPU generator per image)."""
    pipe = tiny_pipeline()
    if scheduler_cls is not None:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32, output_type="np",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("steps,guidance,scheduler", [(8, 7.5, "default"), (6, 7.5, "auto"), (5, 1.0, "auto")])
def test_loop_matches_the_diffusers_pipeline(steps, guidance, scheduler):
    # "default" = the checkpoint's PNDM (what runs at 50 steps; 8 keep the test fast), "auto" below 50 = DPM-Solver
    gen = StableDiffusionGenerator(tiny_pipeline(), steps=steps, guidance=guidance, dtype="fp32", scheduler=scheduler)
    ours = gen.generate_uint8(PROMPTS, SEEDS).numpy()
    assert ours.shape == (4, 32, 32, 3) and ours.dtype == np.uint8
    ref = _pipeline_reference(steps, guidance, scheduler_cls=type(gen.scheduler))
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1, diff.max()
    assert ours.std() > 1  # not a constant image: the comparison means something
    assert gen.describe()["config"]["scheduler"] == ("PNDMScheduler" if scheduler == "default" else
                                                     "DPMSolverMultistepScheduler")


def test_images_do_not_depend_on_batch_size_order_or_neighbours():
    gen = StableDiffusionGenerator(tiny_pipeline(), steps=4, dtype="fp32")
    full = gen.generate_uint8(PROMPTS, SEEDS).numpy().astype(int)
    singles = np.stack([gen.generate_uint8([p], [s]).numpy()[0] for p, s in zip(PROMPTS, SEEDS)]).astype(int)
    rev = gen.generate_uint8(PROMPTS[::-1], SEEDS[::-1]).numpy()[::-1].astype(int)
    # batched convolutions are not bitwise batch-invariant: allow one level of rounding
    assert np.abs(full - singles).max() <= 1 and np.abs(full - rev).max() <= 1
    assert np.abs(full[0] - full[2]).mean() > 5  # same prompt, other seed: another image


def test_each_distinct_prompt_is_encoded_once():
    gen = StableDiffusionGenerator(tiny_pipeline(), steps=2, dtype="fp32")
    gen.generate_uint8(PROMPTS, SEEDS)
    assert gen.stats["text_encoded"] == 3
    gen.generate_uint8(PROMPTS[:2] + ["a photo of a owl."], SEEDS[:3])
    assert gen.stats["text_encoded"] == 4 and gen.stats["text_cache_hits"] == 2  # distinct prompts
    assert gen.stats["unet_calls"] == 4  # one UNet call per step for 2B latents (batched guidance)


def test_fused_qkv_and_sdpa_preferences_compute_the_same_images():
    a = StableDiffusionGenerator(tiny_pipeline(), steps=3, dtype="fp32", fuse_qkv=False).generate_uint8(PROMPTS, SEEDS)
    b_gen = StableDiffusionGenerator(tiny_pipeline(), steps=3, dtype="fp32", fuse_qkv=True, sdpa_backend="math")
    b = b_gen.generate_uint8(PROMPTS, SEEDS)
    assert b_gen.fused_qkv and b_gen.sdpa_backend == "math"
    assert (a.int() - b.int()).abs().max() <= 1


def test_sdpa_kernel_timing_rejects_a_kernel_that_disagrees(monkeypatch):
    """The timed choice of SDPA kernel (CUDA in production) refuses a kernel whose UNet output differs."""
    import contextlib

    import gift_fast.synth.generators as G
    real_context = G._sdpa_context
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    @contextlib.contextmanager
    def context(choice):
        if choice == "cudnn":  # pretend this kernel is broken on this machine
            monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                                lambda *a, **kw: real_sdpa(*a, **kw) * 0.5)
            try:
                yield
            finally:
                monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", real_sdpa)
        else:
            with real_context(choice):
                yield

    monkeypatch.setattr(G, "_sdpa_context", context)
    gen = StableDiffusionGenerator(tiny_pipeline(), steps=2, dtype="fp32")
    best = gen._time_sdpa_backends(2)
    assert "cudnn (rejected)" in gen.sdpa_timings and best != "cudnn"
    assert {"default", "flash", "efficient"} <= set(gen.sdpa_timings)
    assert best in ("default", "flash", "efficient")


def test_padded_fixed_batch_gives_the_same_images():
    """With compile, calls are padded to one batch shape; the padding must not change the real images."""
    gen = StableDiffusionGenerator(tiny_pipeline(), steps=3, dtype="fp32")
    ref = gen.generate_uint8(PROMPTS[:2], SEEDS[:2])
    for mode in ("unet", "all"):
        padded = StableDiffusionGenerator(tiny_pipeline(), steps=3, dtype="fp32", decode_batch=3)
        padded._prepared = True          # skip the real torch.compile (slow on a CPU); keep its padding logic
        padded.compile, padded._static_batch = mode, 5
        out = padded.generate_uint8(PROMPTS[:2], SEEDS[:2])
        assert out.shape == ref.shape and (out.int() - ref.int()).abs().max() <= 1


def test_safety_checker_blacks_out_flagged_images_and_the_engine_regenerates_them(tmp_path):
    from gift_fast.synth.engine import synthesize_task

    class FlagFirstCalls(torch.nn.Module):
        """Flags every image of the first call, like the diffusers checker (returns (images, flags))."""

        def __init__(self):
            super().__init__()
            self.calls, self.inputs = 0, []

        def forward(self, images, clip_input):
            self.inputs.append(tuple(clip_input.shape))
            self.calls += 1
            return images, [self.calls == 1] * images.shape[0]

    checker = FlagFirstCalls()
    gen = StableDiffusionGenerator.tiny(steps=2, dtype="fp32", safety_checker_module=checker)
    first = gen.generate(PROMPTS[:2], SEEDS[:2])
    assert all(max(hi for _, hi in im.getextrema()) == 0 for im in first)  # black, as the pipeline returns
    assert checker.inputs == [(2, 3, 224, 224)]
    checker.calls = 0
    folder = synthesize_task(gen, "T", PROMPTS, tmp_path, seed=1, task_index=0, batch_size=4, progress=False)
    m = json.loads((folder / "manifest.json").read_text())
    assert m["retries"] == {"0": 1, "1": 1, "2": 1, "3": 1} and m["counts"]["black_kept"] == 0
    assert gen.describe()["runtime"]["safety_checker"] is True
    off = StableDiffusionGenerator.tiny(steps=2, dtype="fp32", safety_checker_module=FlagFirstCalls(),
                                        safety_checker=False)
    assert all(max(hi for _, hi in im.getextrema()) > 0 for im in off.generate(PROMPTS[:2], SEEDS[:2]))


def test_scheduler_rule_and_bad_arguments():
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler
    pipe = tiny_pipeline()
    assert isinstance(StableDiffusionGenerator(pipe, steps=50).scheduler, PNDMScheduler)
    assert isinstance(StableDiffusionGenerator(pipe, steps=25).scheduler, DPMSolverMultistepScheduler)
    assert isinstance(StableDiffusionGenerator(pipe, steps=50, scheduler="dpm").scheduler,
                      DPMSolverMultistepScheduler)
    assert isinstance(StableDiffusionGenerator(pipe, steps=10, scheduler="default").scheduler, PNDMScheduler)
    for kw, msg in [(dict(scheduler="euler"), "unknown scheduler"), (dict(steps=0), "steps"),
                    (dict(attention="flash3"), "unknown attention"), (dict(height=30), "multiples of 4"),
                    (dict(dtype="int8"), "unknown dtype"), (dict(compile="yes"), "compile")]:
        with pytest.raises(ValueError, match=msg):
            StableDiffusionGenerator(pipe, **kw)
    gen = StableDiffusionGenerator(pipe, steps=2)
    with pytest.raises(ValueError, match="one seed per prompt"):
        gen.generate(["a", "b"], [1])
    assert resolve_dtype(None, "cpu") == torch.float32 and resolve_dtype(None, "cuda") == torch.bfloat16


def test_xformers_is_used_only_where_its_cuda_operators_run():
    ok, why = xformers_cuda_works("cpu")
    assert not ok and "CUDA" in why
    gen = StableDiffusionGenerator(tiny_pipeline(), steps=2, attention="xformers")
    assert gen.attention_backend == "sdpa" and "xformers" in gen.attention_note
    assert gen.attention_summary().startswith("sdpa")


def test_from_pretrained_local_folder_and_clear_errors(tmp_path):
    folder = tmp_path / "tiny-sd"
    tiny_pipeline().save_pretrained(folder)
    gen = StableDiffusionGenerator.from_pretrained(str(folder), device="cpu", dtype="fp32", steps=2)
    assert gen.describe()["config"]["model"] == str(folder)
    assert gen.generate_uint8(PROMPTS[:1], SEEDS[:1]).shape == (1, 32, 32, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StableDiffusionGenerator.from_pretrained(str(tmp_path / "nope"), device="cpu")
    empty = tmp_path / "not-a-pipeline"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a diffusers pipeline folder"):
        StableDiffusionGenerator.from_pretrained(str(empty), device="cpu")
    (empty / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'unet' folder"):
        StableDiffusionGenerator.from_pretrained(str(empty), device="cpu")


def test_tiny_tokenizer_is_a_clip_tokenizer():
    tok = tiny_sd_tokenizer()
    ids = tok(["a photo of a tench."], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and max(ids) < 49408
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "aphotoofatench."


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("GIFT_FAST_GPU_TESTS") != "1",
                    reason="needs CUDA and GIFT_FAST_GPU_TESTS=1")
def test_cuda_fast_path_matches_float32_reference():
    """On the GPU: the bf16 fast path (channels_last, fused QKV, timed SDPA kernel) against fp32."""
    torch.backends.cudnn.allow_tf32 = False  # an fp32 reference that is really fp32
    ref = StableDiffusionGenerator(tiny_pipeline(device="cuda"), steps=6, dtype="fp32", channels_last=False,
                                   fuse_qkv=False, sdpa_backend="math").generate_uint8(PROMPTS, SEEDS)
    from diffusers import DPMSolverMultistepScheduler
    pipe_ref = _pipeline_reference(6, 7.5, scheduler_cls=DPMSolverMultistepScheduler)
    assert np.abs(ref.numpy().astype(int) - pipe_ref.astype(int)).max() <= 2  # fp32 GPU vs fp32 CPU pipeline
    fast = StableDiffusionGenerator(tiny_pipeline(device="cuda"), steps=6, dtype="bf16")
    out = fast.generate_uint8(PROMPTS, SEEDS)
    assert fast.attention_backend in ("sdpa", "xformers") and fast.sdpa_backend in (
        "default", "cudnn", "flash", "efficient")
    torch.backends.cudnn.allow_tf32 = True
    diff = (out.int() - ref.int()).abs().float()
    assert diff.mean() < 4, diff.mean()  # 0.6 levels on the CPU

"""``gift-fast synth``: Stable Diffusion images for each task of a continual sequence.

Parses options and calls ``gift_fast.synth.engine.synthesize_sequence``; torch and
diffusers are imported only when the command runs.
"""
from __future__ import annotations

import logging
import os
import sys
import time

import click

from gift_fast.cli.sd_options import SDPA_CHOICES, generator_fields, merge_alias, sd_options

TINY_TASKS = [("ToyShapes", ["circle", "square", "triangle", "star"]),
              ("ToyAnimals", ["cat", "dog", "horse"]),
              ("ToyVehicles", ["car", "bicycle", "boat", "train", "plane"])]

# preset -> defaults for options the user did not give
PRESETS = {
    "tiny": dict(images_per_task=6, steps=4, batch_size=4, height=32, width=32, out="runs/synth-tiny",
                 device="cpu", dtype="fp32", safety_checker=False),   # the tiny pipeline has no checker
}


def _echo(msg: str, rank: int = 0) -> None:
    if rank == 0:
        click.echo(msg, err=True)


def _init_distributed(device_opt):
    """rank, world_size, device from torchrun's environment (one process per GPU)."""
    from gift_fast.distributed import init_from_env

    try:
        dist, device = init_from_env(device_opt)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return dist.rank, dist.world_size, device


@click.command("synth")
@click.option("--order", type=int, default=None, help="MTIL order 1 or 2: the 11 tasks and their class names "
              "(default 1, as in train).")
@click.option("--task-file", type=click.Path(dir_okay=False), default=None,
              help='Custom tasks: JSON {"tasks": [{"name": ..., "classnames": [...]}], "base_classnames": [...]?} '
                   "or CSV with header task,classname.")
@click.option("--tasks", "only", default=None, help="Comma-separated subset of the sequence to synthesize "
              "(the class pool still includes every earlier task), e.g. Aircraft,DTD.")
@click.option("--images-per-task", type=int, default=None, help="Images per task (default 1000).")
@click.option("--out", default=None, help="Output root (default data/synthetic): <out>/<Task>_Syn/<i>.jpeg.")
@sd_options("Denoising steps (default 50, the paper's; below 50: DPM-Solver multistep, e.g. 25).")
@click.option("--guidance", type=float, default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Network precision (default bf16 on CUDA, fp32 on CPU).")
@click.option("--bf16", "bf16_flag", is_flag=True, help="Same as --dtype bf16.")
@click.option("--seed", type=int, default=42, show_default=True, help="Run seed (prompts and image seeds).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="tiny: a tiny random diffusers pipeline built in code, CPU, seconds (CI).")
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda:LOCAL_RANK if available).")
@click.option("--scheduler", type=click.Choice(["auto", "default", "dpm"]), default="auto", show_default=True,
              help="auto: the checkpoint's scheduler at >= 50 steps, DPM-Solver multistep below.")
@click.option("--height", type=int, default=None, help="Image height (default: the model's).")
@click.option("--width", type=int, default=None, help="Image width (default: the model's).")
@click.option("--max-retries", type=int, default=10, show_default=True,
              help="Regenerations (next seed) of an image the safety checker blacked out.")
@click.option("--jpeg-quality", type=int, default=75, show_default=True, help="JPEG quality (Pillow's default).")
@click.option("--template", default=None,
              help="One template for every pool entry (default: each data set's own first template, as the "
                   "authors; ImageNet names: 'a photo of a {}.').")
@click.option("--overwrite", is_flag=True, help="Regenerate images of another configuration in --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--prompts-only", is_flag=True,
              help="Write every task's image_text.csv and manifest, no images: no model is loaded (seconds on a CPU).")
@click.option("--prompts-from", type=click.Path(file_okay=False), default=None,
              help="Generate images for the prompts of DIR/<Task>_Syn/image_text.csv (e.g. the authors' released "
                   "files; rows are matched by file name). --images-per-task: the first N rows (default all).")
@click.option("--seed-scheme", type=click.Choice(["hash", "authors"]), default="hash", show_default=True,
              help="hash: per-image hashed seeds and prompt draws. authors: the authors' txt2img.py: prompts from "
                   "Python's random.Random(--seed) task after task, image j of task t seed "
                   "j + 100000*(t-1) + 10**7*seed (t 0-based).")
@click.option("--pool-exclude", default=None,
              help="Comma-separated data sets whose classes stay out of the prompt pool (paper Fig. 9), "
                   "e.g. ImageNet or Aircraft; recorded in the manifests.")
# old spellings (one release): the same settings as the --sd-* options above
@click.option("--steps", "old_steps", type=int, default=None, hidden=True)
@click.option("--model", "old_model", default=None, hidden=True)
@click.option("--batch-size", "old_batch_size", type=int, default=None, hidden=True)
@click.option("--compile", "old_compile", is_flag=True, default=None, hidden=True)
@click.option("--compile-vae", "old_compile_vae", is_flag=True, default=None, hidden=True)
@click.option("--compile-mode", "old_compile_mode", default=None, hidden=True)
@click.option("--attention", "old_attention", type=click.Choice(["auto", "sdpa", "xformers"]), default=None,
              hidden=True)
@click.option("--sdpa-backend", "old_sdpa_backend", type=click.Choice(SDPA_CHOICES), default=None, hidden=True)
@click.option("--no-safety-checker", "old_no_safety_checker", is_flag=True, default=None, hidden=True)
def synth(order, task_file, only, images_per_task, out, guidance, dtype, bf16_flag, seed, preset, device, scheduler,
          height, width, max_retries, jpeg_quality, template, overwrite, quiet, prompts_only, prompts_from,
          seed_scheme, pool_exclude, **sd):
    """Generate the synthetic replay images of GIFT for every task of a sequence.

    On CUDA the defaults are the fastest exact configuration measured (bench/RESULTS.md):
    bf16, UNet compiled, batch 32; --sd-compile none runs eager at batch 16.

    \b
    gift-fast synth --sd-steps 25 --out data/synthetic       # MTIL Order I (--order 1, the default)
    gift-fast synth --preset tiny                      # seconds on a CPU, no download
    gift-fast synth --order 1 --prompts-only --out data/synthetic   # the prompts only, no model
    gift-fast synth --order 1 --prompts-from AUTHORS_DIR --seed-scheme authors --out data/synthetic
    torchrun --nproc_per_node 8 -m gift_fast.cli.main synth --order 1 ...   # shards images over GPUs
    """
    from gift_fast.synth.engine import SynthError, check_writable, load_task_file, mtil_tasks

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sd = _merge_old_spellings(sd)
    defaults = PRESETS.get(preset, {})
    if sd.get("sd_steps") is None:
        sd["sd_steps"] = defaults.get("steps")
    if sd.get("sd_batch_size") is None:
        sd["sd_batch_size"] = defaults.get("batch_size")
    if sd.get("sd_safety_checker") is None:
        sd["sd_safety_checker"] = defaults.get("safety_checker")
    if images_per_task is None and not prompts_from:   # --prompts-from: all rows unless given
        images_per_task = defaults.get("images_per_task", 1000)
    out = out if out is not None else defaults.get("out", "data/synthetic")
    height = height if height is not None else defaults.get("height")
    width = width if width is not None else defaults.get("width")
    device = device if device is not None else defaults.get("device")
    if bf16_flag:
        if dtype not in (None, "bf16"):
            raise click.UsageError(f"--bf16 contradicts --dtype {dtype}")
        dtype = "bf16"
    dtype = dtype if dtype is not None else defaults.get("dtype")
    if preset and sd.get("sd_model"):
        raise click.UsageError("--preset tiny builds its own model: drop --sd-model (or drop --preset)")
    if order is not None and task_file:
        raise click.UsageError("give --order or --task-file, not both")
    if prompts_only and prompts_from:
        raise click.UsageError("--prompts-only writes new prompts; --prompts-from reads existing ones: give one")
    for name, v in (("--sd-steps", sd.get("sd_steps")), ("--images-per-task", images_per_task),
                    ("--sd-batch-size", sd.get("sd_batch_size"))):
        if v is not None and v < 1:
            raise click.BadParameter(f"{name} must be >= 1, got {v}")
    from gift_fast.validation import OptionError, check_synth_options

    try:   # every number before any work (--guidance nan would turn guidance off and write NaN)
        check_synth_options(guidance=guidance, height=height, width=width, max_retries=max_retries,
                            jpeg_quality=jpeg_quality, seed=seed, device=device)
    except OptionError as e:
        raise click.BadParameter(str(e)) from None

    base = None
    try:
        if task_file:
            tasks, base = load_task_file(task_file)
        elif order is None and preset == "tiny":
            tasks = TINY_TASKS
        else:
            tasks = mtil_tasks(1 if order is None else order)   # Order I by default, as gift-fast train
    except (ValueError, FileNotFoundError, SynthError) as e:
        raise click.UsageError(str(e)) from None
    only_list = [s.strip() for s in only.split(",") if s.strip()] if only else None
    if only_list:
        unknown = [o for o in only_list if o not in [t[0] for t in tasks]]
        if unknown:
            raise click.UsageError(f"unknown task(s) in --tasks: {', '.join(unknown)}; "
                                   f"the sequence has: {', '.join(t[0] for t in tasks)}")

    exclude = [s.strip() for s in pool_exclude.split(",") if s.strip()] if pool_exclude else []
    if exclude:
        base_name = "ImageNet" if base is None else "base"
        known = [base_name] + [t[0] for t in tasks]
        unknown = [e for e in exclude if e not in known]
        if unknown:
            raise click.UsageError(f"unknown data set(s) in --pool-exclude: {', '.join(unknown)}; "
                                   f"the pool's sources are: {', '.join(known)}")

    # checks before cost: the output folder and its disk, then the model (before loading it)
    from gift_fast.preflight import SYNTH_JPEG_BYTES, ModelUnavailable, check_free_space, check_sd_model
    from gift_fast.synth.generators import GeneratorConfig
    created_out = not os.path.exists(out)
    try:
        check_writable(out)
        n_tasks = len(only_list) if only_list else len(tasks)
        if preset is None and not prompts_only:   # the tiny preset's 32x32 images take kilobytes; CSVs too
            n_images = images_per_task or 1000       # --prompts-from without --images-per-task: the paper's 1,000
            check_free_space(out, n_tasks * n_images * SYNTH_JPEG_BYTES, f"{n_tasks} x {n_images} images",
                             "choose another --out")
    except (SynthError, OSError) as e:
        raise click.UsageError(str(e)) from None
    sequence_kw = dict(seed_scheme=seed_scheme, pool_exclude=exclude, prompts_from=prompts_from)
    if prompts_only:
        _prompts_only(tasks=tasks, out=out, images_per_task=images_per_task, seed=seed, base=base,
                      template=template, only_list=only_list, sequence_kw=sequence_kw)
        return
    rank, world, dev = _init_distributed(device)
    gen_fields = generator_fields(sd)
    gen_fields.update(guidance=guidance, scheduler=scheduler, height=height, width=width, dtype=dtype)
    try:
        gen_cfg = GeneratorConfig(**gen_fields).resolve(dev)
        local_only = None if preset == "tiny" else check_sd_model(gen_cfg.model)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    except ModelUnavailable as e:
        raise click.ClickException(str(e)) from None

    t0 = time.perf_counter()
    import torch
    threads = torch.get_num_threads()
    if preset == "tiny" and dev.type == "cpu":
        torch.set_num_threads(1)  # tiny convolutions gain nothing from threads; they only contend
    try:
        _run(preset=preset, gen_cfg=gen_cfg, local_only=local_only, dev=dev, tasks=tasks, out=out,
             images_per_task=images_per_task, seed=seed, base=base, template=template, only_list=only_list,
             rank=rank, world=world, quiet=quiet, jpeg_quality=jpeg_quality, max_retries=max_retries,
             overwrite=overwrite, t0=t0, sequence_kw=sequence_kw)
    except BaseException:
        if created_out and rank == 0:     # a failed start (e.g. a missing model) leaves no empty folder behind
            try:
                os.rmdir(out)             # only if nothing was written
            except OSError:
                pass
        raise
    finally:
        torch.set_num_threads(threads)


def _prompts_only(*, tasks, out, images_per_task, seed, base, template, only_list, sequence_kw):
    """--prompts-only: the CSVs and manifests, no model (nothing heavy is imported)."""
    from gift_fast.synth.engine import SynthError, synthesize_sequence

    t0 = time.perf_counter()
    try:
        manifest = synthesize_sequence(None, tasks, out, images_per_task=images_per_task, seed=seed,
                                       base_classnames=base, template=template, only=only_list, prompts_only=True,
                                       run_info={"command": " ".join(["gift-fast"] + sys.argv[1:])}, **sequence_kw)
    except (SynthError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    n = len(manifest.get("tasks", {}))
    _echo(f"prompts only: {out} | {n} tasks x {images_per_task} prompts ({sequence_kw['seed_scheme']} scheme) | "
          f"{time.perf_counter() - t0:.1f} s")


def _merge_old_spellings(sd: dict) -> dict:
    """--steps, --model, --batch-size, --compile[-vae|-mode], --attention, --sdpa-backend, --no-safety-checker:
    the spellings before the --sd-* options, kept hidden for one release."""
    old_compile = sd.pop("old_compile", None)
    old_vae = sd.pop("old_compile_vae", None)
    compile_old = ("all" if old_vae else "unet") if old_compile else None
    if old_vae and not old_compile:
        raise click.UsageError("--compile-vae goes with --compile (now: --sd-compile all)")
    no_checker = sd.pop("old_no_safety_checker", None)
    pairs = [("--sd-steps", "sd_steps", "--steps", sd.pop("old_steps", None)),
             ("--sd-model", "sd_model", "--model", sd.pop("old_model", None)),
             ("--sd-batch-size", "sd_batch_size", "--batch-size", sd.pop("old_batch_size", None)),
             ("--sd-compile", "sd_compile", "--compile", compile_old),
             ("--sd-compile-mode", "sd_compile_mode", "--compile-mode", sd.pop("old_compile_mode", None)),
             ("--sd-attention", "sd_attention", "--attention", sd.pop("old_attention", None)),
             ("--sd-sdpa-backend", "sd_sdpa_backend", "--sdpa-backend", sd.pop("old_sdpa_backend", None)),
             ("--sd-safety-checker", "sd_safety_checker", "--no-safety-checker", False if no_checker else None)]
    for new_name, dest, old_name, old in pairs:
        sd[dest] = merge_alias(new_name, sd.get(dest), old_name, old)
    return sd


def _run(*, preset, gen_cfg, local_only, dev, tasks, out, images_per_task, seed, base, template, only_list, rank,
         world, quiet, jpeg_quality, max_retries, overwrite, t0, sequence_kw):
    """Load the generator and synthesize (after the options were checked)."""
    from gift_fast.synth.engine import SynthError, synthesize_sequence
    from gift_fast.synth.generators import StableDiffusionGenerator

    batch_size = gen_cfg.batch_size
    try:
        if preset == "tiny":
            generator = StableDiffusionGenerator.tiny(device=dev, dtype=gen_cfg.dtype, **gen_cfg.generator_kwargs())
        else:
            generator = StableDiffusionGenerator.from_config(gen_cfg, device=dev, local_files_only=local_only)
    except (ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from None
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    cfg = generator.describe()["config"]
    _echo(f"gift-fast synth: {cfg['model']} | {cfg['scheduler']} {cfg['steps']} steps | guidance {cfg['guidance']} | "
          f"{cfg['height']}x{cfg['width']} | {str(generator.dtype).replace('torch.', '')} on {dev} | "
          f"{len(tasks)} tasks x {images_per_task or 'all CSV'} images | world size {world} | "
          f"loaded in {time.perf_counter() - t0:.1f} s", rank)
    _echo(f"generator: {gen_cfg.summary()}", rank)
    try:
        manifest = synthesize_sequence(
            generator, tasks, out, images_per_task=images_per_task, seed=seed, base_classnames=base,
            template=template, only=only_list, batch_size=batch_size, rank=rank, world_size=world,
            progress=not quiet, jpeg_quality=jpeg_quality, max_retries=max_retries, overwrite=overwrite,
            run_info={"command": " ".join(["gift-fast"] + sys.argv[1:])}, **sequence_kw)
    except (SynthError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    finally:
        _echo(f"attention: {generator.attention_summary()}", rank)
        try:
            import torch.distributed as tdist
            if tdist.is_initialized():
                tdist.destroy_process_group()
        except Exception:
            pass
    c = manifest.get("counts", {})
    _echo(f"done: {out} | {c.get('tasks_complete')} tasks complete, {c.get('images')} images, "
          f"{c.get('black_regenerations')} black regenerations, {c.get('black_kept')} kept black | "
          f"{manifest.get('wall_time_s')} s", rank)

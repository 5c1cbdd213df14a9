"""``gift-fast synth``: Stable Diffusion images for each task of a continual sequence.

Parses options and calls ``gift_fast.synth.engine.synthesize_sequence``; torch and
diffusers are imported only when the command runs.
"""
from __future__ import annotations

import sys

import click

TINY_TASKS = [("ToyShapes", ["circle", "square", "triangle", "star"]),
              ("ToyAnimals", ["cat", "dog", "horse"]),
              ("ToyVehicles", ["car", "bicycle", "boat", "train", "plane"])]

# preset -> defaults for options the user did not give
PRESETS = {
    "tiny": dict(images_per_task=6, steps=4, batch_size=4, height=32, width=32, out="runs/synth-tiny",
                 device="cpu", dtype="fp32"),
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
@click.option("--order", type=int, default=None, help="MTIL order 1 or 2 (the 11 tasks and their class names).")
@click.option("--task-file", type=click.Path(dir_okay=False), default=None,
              help='Custom tasks: JSON {"tasks": [{"name": ..., "classnames": [...]}], "base_classnames": [...]?} '
                   "or CSV with header task,classname.")
@click.option("--tasks", "only", default=None, help="Comma-separated subset of the sequence to synthesize "
              "(the class pool still includes every earlier task), e.g. Aircraft,DTD.")
@click.option("--steps", type=int, default=None, help="Denoising steps (default 50; below 50: DPM-Solver multistep).")
@click.option("--images-per-task", type=int, default=None, help="Images per task (default 1000).")
@click.option("--out", default=None, help="Output root (default data/synthetic): <out>/<Task>_Syn/<i>.jpeg.")
@click.option("--model", default=None, help="Diffusers SD-1.x/2.x pipeline: Hub id or local folder "
              "(default stable-diffusion-v1-5/stable-diffusion-v1-5).")
@click.option("--guidance", type=float, default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--batch-size", type=int, default=None, help="Images per generator call (default 16).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="Network precision (default bf16 on CUDA, fp32 on CPU).")
@click.option("--bf16", "bf16_flag", is_flag=True, help="Same as --dtype bf16.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the UNet (fixed batch shape).")
@click.option("--compile-vae", is_flag=True, help="Also compile the VAE decoder (with --compile).")
@click.option("--compile-mode", default="default", show_default=True,
              help="torch.compile mode: default, reduce-overhead, max-autotune-no-cudagraphs, ...")
@click.option("--seed", type=int, default=42, show_default=True, help="Run seed (prompts and image seeds).")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="tiny: a tiny random diffusers pipeline built in code, CPU, seconds (CI).")
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: cuda:LOCAL_RANK if available).")
@click.option("--attention", type=click.Choice(["auto", "sdpa", "xformers"]), default="auto", show_default=True,
              help="sdpa: PyTorch SDPA; xformers: only if its CUDA operators work here.")
@click.option("--sdpa-backend", type=click.Choice(["auto", "default", "cudnn", "flash", "efficient"]),
              default="auto", show_default=True, help="SDPA kernel preference (auto: timed on the UNet).")
@click.option("--scheduler", type=click.Choice(["auto", "default", "dpm"]), default="auto", show_default=True,
              help="auto: the checkpoint's scheduler at >= 50 steps, DPM-Solver multistep below.")
@click.option("--height", type=int, default=None, help="Image height (default: the model's).")
@click.option("--width", type=int, default=None, help="Image width (default: the model's).")
@click.option("--no-safety-checker", is_flag=True, help="Do not run the pipeline's safety checker.")
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
def synth(order, task_file, only, steps, images_per_task, out, model, guidance, batch_size, dtype, bf16_flag,
          compile_, compile_vae, compile_mode, seed, preset, device, attention, sdpa_backend, scheduler, height,
          width, no_safety_checker, max_retries, jpeg_quality, template, overwrite, quiet, prompts_only,
          prompts_from, seed_scheme, pool_exclude):
    """Generate the synthetic replay images of GIFT for every task of a sequence.

    \b
    gift-fast synth --order 1 --steps 25 --images-per-task 1000 --out data/synthetic --bf16
    gift-fast synth --preset tiny                      # seconds on a CPU, no download
    gift-fast synth --order 1 --prompts-only --out data/synthetic   # the prompts only, no model
    gift-fast synth --order 1 --prompts-from AUTHORS_DIR --seed-scheme authors --out data/synthetic
    torchrun --nproc_per_node 8 -m gift_fast.cli.main synth --order 1 ...   # shards images over GPUs
    """
    import logging
    import time

    from gift_fast.synth.engine import SynthError, check_writable, load_task_file, mtil_tasks

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    defaults = PRESETS.get(preset, {})
    steps = steps if steps is not None else defaults.get("steps", 50)
    if images_per_task is None and not prompts_from:   # --prompts-from: all rows unless given
        images_per_task = defaults.get("images_per_task", 1000)
    batch_size = batch_size if batch_size is not None else defaults.get("batch_size", 16)
    out = out if out is not None else defaults.get("out", "data/synthetic")
    height = height if height is not None else defaults.get("height")
    width = width if width is not None else defaults.get("width")
    device = device if device is not None else defaults.get("device")
    if bf16_flag:
        if dtype not in (None, "bf16"):
            raise click.UsageError(f"--bf16 contradicts --dtype {dtype}")
        dtype = "bf16"
    dtype = dtype if dtype is not None else defaults.get("dtype")
    if preset and model:
        raise click.UsageError("--preset tiny builds its own model: drop --model (or drop --preset)")
    if order is not None and task_file:
        raise click.UsageError("give --order or --task-file, not both")
    if prompts_only and prompts_from:
        raise click.UsageError("--prompts-only writes new prompts; --prompts-from reads existing ones: give one")
    for name, v in (("--steps", steps), ("--images-per-task", images_per_task), ("--batch-size", batch_size)):
        if v is not None and v < 1:
            raise click.BadParameter(f"{name} must be >= 1, got {v}")

    base = None
    try:
        if task_file:
            tasks, base = load_task_file(task_file)
        elif order is not None:
            tasks = mtil_tasks(order)
        elif preset == "tiny":
            tasks = TINY_TASKS
        else:
            raise click.UsageError("say which tasks: --order 1|2 (MTIL), --task-file FILE, or --preset tiny")
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

    try:  # before loading a model that may take a minute
        check_writable(out)
    except SynthError as e:
        raise click.UsageError(str(e)) from None
    sequence_kw = dict(seed_scheme=seed_scheme, pool_exclude=exclude, prompts_from=prompts_from)
    if prompts_only:
        _prompts_only(tasks=tasks, out=out, images_per_task=images_per_task, seed=seed, base=base,
                      template=template, only_list=only_list, sequence_kw=sequence_kw)
        return
    rank, world, dev = _init_distributed(device)

    gen_kwargs = dict(steps=steps, guidance=guidance, scheduler=scheduler, height=height, width=width,
                      attention=attention, sdpa_backend=sdpa_backend,
                      compile=("all" if compile_vae else "unet") if compile_ else False, compile_mode=compile_mode)
    t0 = time.perf_counter()
    import torch
    threads = torch.get_num_threads()
    if preset == "tiny" and dev.type == "cpu":
        torch.set_num_threads(1)  # tiny convolutions gain nothing from threads; they only contend
    try:
        _run(preset=preset, model=model, dev=dev, dtype=dtype, no_safety_checker=no_safety_checker,
             gen_kwargs=gen_kwargs, tasks=tasks, out=out, images_per_task=images_per_task, seed=seed, base=base,
             template=template, only_list=only_list, batch_size=batch_size, rank=rank, world=world, quiet=quiet,
             jpeg_quality=jpeg_quality, max_retries=max_retries, overwrite=overwrite, t0=t0,
             sequence_kw=sequence_kw)
    finally:
        torch.set_num_threads(threads)


def _prompts_only(*, tasks, out, images_per_task, seed, base, template, only_list, sequence_kw):
    """--prompts-only: the CSVs and manifests, no model (nothing heavy is imported)."""
    import time

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


def _run(*, preset, model, dev, dtype, no_safety_checker, gen_kwargs, tasks, out, images_per_task, seed, base,
          template, only_list, batch_size, rank, world, quiet, jpeg_quality, max_retries, overwrite, t0,
          sequence_kw):
    """Load the generator and synthesize (after the options were checked)."""
    import time

    from gift_fast.synth.engine import SynthError, synthesize_sequence
    from gift_fast.synth.generators import DEFAULT_MODEL, StableDiffusionGenerator

    try:
        if preset == "tiny":
            generator = StableDiffusionGenerator.tiny(device=dev, dtype=dtype, **gen_kwargs)
        else:
            generator = StableDiffusionGenerator.from_pretrained(model or DEFAULT_MODEL, device=dev, dtype=dtype,
                                                                 safety_checker=not no_safety_checker, **gen_kwargs)
    except (ValueError, FileNotFoundError) as e:
        raise click.UsageError(str(e)) from None
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    cfg = generator.describe()["config"]
    _echo(f"gift-fast synth: {cfg['model']} | {cfg['scheduler']} {cfg['steps']} steps | guidance {cfg['guidance']} | "
          f"{cfg['height']}x{cfg['width']} | {str(generator.dtype).replace('torch.', '')} on {dev} | "
          f"{len(tasks)} tasks x {images_per_task or 'all CSV'} images | world size {world} | "
          f"loaded in {time.perf_counter() - t0:.1f} s", rank)
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

"""``gift-fast train`` and ``gift-fast eval``: parse options, call gift_fast.runs / gift_fast.evaluate.

torch and the rest are imported inside the commands so ``gift-fast --help`` stays fast.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import click

from gift_fast.backends import BACKENDS  # imports neither torch nor triton: --help stays fast
from gift_fast.cli.sd_options import merge_alias, sd_options

# The command line spells the distillation losses with hyphens; gift_fast.losses.DISTILL_MODES (the one list)
# with underscores. Mapped here, and only here.
DISTILL_CHOICES = ("contrastive", "feature", "image-only", "text-only", "kl")


def _distill(value):
    return None if value is None else value.replace("-", "_")


# Defaults of the MTIL path (the tiny preset brings its own): the folders the other commands write.
MTIL_DEFAULTS = dict(data_root="data/mtil", synth="data/synthetic", data_cache="data/cache")


def _csv(value):
    if value is None:
        return None
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _seeds(value):
    from gift_fast.validation import OptionError, check_seeds

    try:
        seeds = check_seeds(value)        # `--seeds ,` is an error, not the default
    except OptionError as e:
        raise click.BadParameter(str(e)) from None
    return None if seeds is None else list(seeds)


@click.command("train")
@click.option("--preset", type=click.Choice(["tiny"]), default=None,
              help="tiny: the toy world on a CPU in minutes, no downloads (GIFT vs continual fine-tuning, 3 seeds).")
@click.option("--out", default=None, help="Run folder (several runs: one sub-folder each). Default runs/<preset or "
              "method>.")
@click.option("--resume", is_flag=True, help="Continue the run(s) in --out after the last finished task.")
@click.option("--force", is_flag=True, help="Let a new run go into a non-empty folder that is not a run (it still "
              "refuses one holding any file the run writes, and never deletes a file it did not write).")
# model
@click.option("--model", default=None, help="open_clip architecture (default ViT-B-16) or a tiny one (toy-vit).")
@click.option("--pretrained", default=None, help="open_clip pretrained tag (default openai), a local checkpoint file, "
              "or 'none'. A file of OpenAI's weights: use --model ViT-B-16-quickgelu (QuickGELU).")
# tasks
@click.option("--order", type=int, default=None, help="MTIL order 1 or 2 (default 1).")
@click.option("--tasks", default=None, help="Comma-separated task names instead of an order (MTIL or toy names).")
@click.option("--data-root", default=None, help=f"MTIL data sets (default {MTIL_DEFAULTS['data_root']}; "
              "see `gift-fast data check`).")
@click.option("--data-cache", default=None, help=f"Decoded-image cache (default {MTIL_DEFAULTS['data_cache']}; "
              "'none' to decode every time).")
# method
@click.option("--train-augment/--no-train-augment", default=None,
              help="MTIL training images: the authors' RandomResizedCrop(scale=(0.9, 1.0)) (default on) or the "
                   "evaluation transform.")
@click.option("--method", default=None, help="gift | finetune | l2 | ewc-v, or several separated by commas "
              "(default gift; the tiny preset runs gift,finetune).")
@click.option("--cd/--no-cd", default=None, help="Contrastive distillation on or off (overrides the method).")
@click.option("--ita/--no-ita", default=None, help="Image-text alignment on or off (overrides the method).")
@click.option("--awc/--no-awc", default=None, help="Adaptive weight consolidation on or off (off: none).")
@click.option("--consolidation", type=click.Choice(["none", "uniform", "adaptive", "static"]), default=None,
              help="Weight consolidation explicitly: uniform = the L2 baseline, static = EWC-V.")
@click.option("--distill", type=click.Choice(DISTILL_CHOICES), default=None,
              help="Distillation loss (Tab. 4a). Default contrastive.")
@click.option("--teacher", default=None, help="last | initial | wise:ALPHA (teacher = ALPHA * initial + "
              "(1 - ALPHA) * last). Default last.")
@click.option("--cd-weight", type=float, default=None, help="lambda_cd (default 1).")
@click.option("--ita-weight", type=float, default=None, help="lambda_ita (default 0.25).")
@click.option("--consolidation-weight", type=float, default=None, help="lambda_l2, strength of the weight "
              "consolidation of every kind: uniform, adaptive, static (default 1).")
@click.option("--l2", "old_l2", type=float, default=None, help="The old name of --consolidation-weight.")
@click.option("--awc-decay", type=float, default=None, help="Running Fisher estimate decay beta (default 0).")
@click.option("--fisher-batches", type=int, default=None, help="EWC-V: synthetic batches of the static Fisher "
              "(default 10).")
@click.option("--temperature", type=float, default=None, help="tau of CD (default 2).")
@click.option("--label-smoothing", type=float, default=None, help="Label smoothing of CE and ITA (default 0.2).")
# synthetic data
@click.option("--synth", default=None, help=f"A `gift-fast synth` folder (default {MTIL_DEFAULTS['synth']}) or "
              "'on-the-fly' (generate before each task, discard after).")
@click.option("--reference-images", default=None, type=click.Path(file_okay=False),
              help="Distill on real images instead (Tab. 5): <class>/<image> folders or image_text.csv.")
@click.option("--images-per-task", type=int, default=None, help="Distillation pairs per task (default 1000).")
@click.option("--generator", type=click.Choice(["sd", "toy"]), default=None, help="On-the-fly generator.")
@sd_options("Denoising steps of on-the-fly synthesis (default 50, the paper's; below 50: DPM-Solver multistep).")
@click.option("--synth-seed", type=int, default=None, help="Seed of prompts and images (default: --seeds).")
@click.option("--seed-scheme", "synth_seed_scheme", type=click.Choice(["hash", "authors"]), default=None,
              help="On-the-fly synthesis: hash (default; per-image hashed prompt draws and seeds) or authors (their "
                   "txt2img.py: random.Random(seed) prompt draws, image j of task t seeded j + 100000*(t-1) + "
                   "10**7*seed), as `gift-fast synth --seed-scheme`.")
@click.option("--keep-synth", is_flag=True, default=None, help="Keep on-the-fly images in <out>/synthetic.")
# optimisation
@click.option("--steps", type=int, default=None, help="Iterations per task (default 1000).")
@click.option("--batch-size", type=int, default=None, help="Task images per step (default 64).")
@click.option("--distill-batch-size", "syn_batch_size", type=int, default=None,
              help="Synthetic (distillation) pairs per step (default 64). Not --sd-batch-size, the images per "
              "generator call.")
@click.option("--syn-batch-size", "old_syn_batch_size", type=int, default=None, hidden=True)  # old spelling
@click.option("--warmup", type=int, default=None, help="Warm-up steps of the cosine schedule (default 100).")
@click.option("--lr", type=float, default=None, help="One learning rate for all tasks (default: per task, "
              "5e-5 for Aircraft and MNIST, 1e-5 otherwise).")
# speed
@click.option("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto).")
@click.option("--bf16", is_flag=True, default=None, help="bf16 autocast with fp32 master weights.")
@click.option("--compile/--no-compile", "compile_", default=None, help="Regional torch.compile of the transformer "
              "blocks (default: on CUDA, the fastest measured step; never on the CPU).")
@click.option("--kernels", type=click.Choice(BACKENDS), default=None,
              help="Fused Triton loss and AWC (auto: on CUDA). Default auto.")
@click.option("--threads", type=int, default=None, help="torch CPU threads per run.")
@click.option("--num-workers", type=int, default=None, help="Data loader workers (default 4).")
# evaluation, runs
@click.option("--eval-batch-size", type=int, default=None)
@click.option("--log-every", type=int, default=None, help="Steps between log lines (default 50).")
@click.option("--seeds", default=None, help="Seeds, comma-separated (default 0; the tiny preset 0,1,2).")
@click.option("--jobs", type=int, default=None, help="Runs at a time, in worker processes (CPU presets).")
@click.option("--keep-checkpoints", type=click.Choice(["all", "last"]), default=None)
@click.option("--checkpoint-every", type=int, default=None, help="Also checkpoint every K steps inside a task "
              "(model, optimizer, schedule, AWC, RNG), so --resume continues mid-task. Default 0: only after tasks.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--label", default=None, help="Name of the run(s) in reports.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
# class-incremental benchmarks (gift_fast.cil_trainer)
@click.option("--benchmark", type=click.Choice(["mtil", "cifar100-cil", "tinyimagenet-cil"]), default=None,
              help="mtil (default), or class-incremental: cifar100-cil / tinyimagenet-cil with --increments N.")
@click.option("--increments", type=int, default=None, help="Class-incremental --benchmark: the number of incremental "
              "steps (cifar100-cil 10|20|50, tinyimagenet-cil 5|10|20).")
@click.option("--class-order", default=None, help="Class-incremental class order: zscl (default: ZSCL's orders, "
              "CIFAR100's = iCaRL's), seed:N, icarl, natural, or a YAML / JSON FILE with class_order: [...] (ZSCL's "
              "format). --resume keeps a run's recorded order.")
@click.option("--iterations", type=int, default=None, help="Class-incremental: iterations per step (default: one "
              "epoch of the step's training images).")
# rerunning, experiment tracking (gift_fast.run_config, gift_fast.tracking)
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
              help="Rerun from a run's config.json (or a JSON of options, or the authors' configs/mtil_order_*.json); "
              "options given here override the file.")
@click.option("--report-to", default=None, help="none (default) | tensorboard | wandb | all: also log every log.jsonl "
              "record, evaluation row and the accuracy-matrix figure there (W&B: pip install 'gift-fast[wandb]').")
@click.option("--name", default=None, help="The run's name in TensorBoard / W&B (default: the run folder's name).")
@click.option("--track", default=None, help="Tasks (comma-separated) whose test loss and accuracy are logged during "
              "training, with the train loss and the teacher-student cross entropy (the paper's Fig. 4 and 5): "
              "curves.jsonl, drawn by `gift-fast report --curves`.")
@click.option("--track-every", type=int, default=None, help="Steps between curve points (default: --log-every).")
def train(preset, out, resume, force, method, seeds, jobs, no_plots, quiet, compile_, benchmark, class_order,
          iterations, increments, old_syn_batch_size, old_l2, **opts):
    """Continual training of CLIP on a task sequence with GIFT (or a baseline), evaluation after every task.

    On CUDA the defaults are the fastest exact configuration measured (bench/RESULTS.md):
    compiled blocks (--no-compile: eager), Triton loss and AWC; on-the-fly synthesis as
    `gift-fast synth` (the same --sd-* options).

    \b
    gift-fast train --preset tiny --out runs/tiny        # the toy world, CPU, minutes
    gift-fast train --order 1 --bf16 --out runs/order1   # the paper's MTIL protocol (GPU; --order 1 is the default)
    """

    from gift_fast.distributed import env_world_size

    try:
        world = env_world_size()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    opts["compile"] = compile_
    opts["syn_batch_size"] = merge_alias("--distill-batch-size", opts.get("syn_batch_size"), "--syn-batch-size",
                                         old_syn_batch_size)
    opts["consolidation_weight"] = merge_alias("--consolidation-weight", opts.get("consolidation_weight"), "--l2",
                                               old_l2)
    opts["distill"] = _distill(opts.get("distill"))
    opts["synth_batch_size"] = opts.pop("sd_batch_size", None)
    # --config FILE under the command line's options
    config_file = opts.pop("config_file", None)
    if opts.get("track") is not None:
        opts["track"] = _csv(opts["track"])
    if opts.get("report_to") is not None:     # a bad value or a missing package: say so before any work
        from gift_fast.tracking import check_backends

        try:
            check_backends(opts["report_to"])
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    if config_file is not None:
        if benchmark not in (None, "mtil"):
            raise click.UsageError("--config reruns MTIL and toy runs; a class-incremental --benchmark takes its "
                                   "options on the command line")
        if preset:
            raise click.UsageError("--config FILE holds every setting of the run: drop --preset")
        from gift_fast.run_config import load_config_file

        try:
            file_opts, file_method, file_seed = load_config_file(config_file)
        except (ValueError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None
        method = method or file_method
        seeds = seeds or (None if file_seed is None else str(file_seed))
        opts["_config_file_opts"] = file_opts
    # a class-incremental benchmark
    if benchmark not in (None, "mtil"):
        if increments is not None:
            if opts.get("steps") is not None:
                raise click.UsageError("with --benchmark, give the number of increments as --increments "
                                       "(--steps there is its old spelling): not both")
            opts["steps"] = increments
        elif opts.get("steps") is not None:
            click.echo("note: --steps under --benchmark is the old spelling of --increments", err=True)
        else:
            raise click.UsageError(f"--benchmark {benchmark} needs --increments N, the number of class-incremental "
                                   f"steps")
        if world > 1:
            raise click.UsageError("the class-incremental benchmarks run in one process: start them without "
                                   "torchrun (or with --nproc_per_node 1)")
        if preset:
            raise click.UsageError(f"--preset {preset} and --benchmark {benchmark} do not go together")
        from gift_fast.cil_trainer import run_cil_command

        cil_opts = {k: v for k, v in opts.items() if v is not None}
        for k in ("pretrained", "data_cache"):
            if str(cil_opts.get(k, "")).lower() == "none":
                cil_opts[k] = None
        try:
            text = run_cil_command(benchmark, cil_opts, out=out, resume=resume, methods=_csv(method),
                                   seeds=_seeds(seeds), plots=not no_plots, progress=not quiet,
                                   class_order=class_order, iterations=iterations)
        except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, OSError) as e:
            raise click.ClickException(str(e)) from None
        click.echo(text)
        return
    if class_order is not None or iterations is not None or increments is not None:
        raise click.UsageError("--class-order, --iterations and --increments are options of a class-incremental "
                               "--benchmark")
    if world > 1:
        if jobs not in (None, 1):
            raise click.UsageError(f"--jobs {jobs} runs several runs in worker processes; under torchrun every "
                                   f"process takes part in one run at a time: drop --jobs")
        _train_distributed(preset, out, resume, method, seeds, no_plots, quiet, dict(opts, force=force))
        return
    _train(preset, out, resume, method, seeds, jobs, no_plots, quiet, dict(opts, force=force))


def _train_distributed(preset, out, resume, method, seeds, no_plots, quiet, opts):
    """torchrun: join the process group (NCCL on GPUs, gloo on CPUs), train, report on rank 0."""
    from gift_fast.distributed import init_from_env, shutdown

    from gift_fast.run_config import PRESETS

    device = opts.get("device") or (PRESETS[preset].get("device") if preset else None)
    try:
        dist, _ = init_from_env(device)
    except (ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    try:
        _train(preset, out, resume, method, seeds, 1, no_plots, quiet or not dist.is_main, opts,
               write_report=dist.is_main)
    finally:
        shutdown()


def _train(preset, out, resume, method, seeds, jobs, no_plots, quiet, opts, write_report=True):
    from gift_fast import runs as several_runs
    from gift_fast.report import report
    from gift_fast.run_config import PRESET_RUNS, TrainConfig, preset_config

    file_opts = opts.pop("_config_file_opts", None)      # --config FILE: its values, None included
    none_pretrained = (opts.get("pretrained") or "").lower() == "none"
    none_cache = (opts.get("data_cache") or "").lower() == "none"
    opts = {k: v for k, v in opts.items() if v is not None}
    if "tasks" in opts:
        opts["tasks"] = _csv(opts["tasks"])
    if none_pretrained:
        opts["pretrained"] = None
    if none_cache:
        opts["data_cache"] = None
    methods = _csv(method)
    seed_list = _seeds(seeds)
    from gift_fast.validation import check_int, check_order_and_tasks

    check_int("--jobs", jobs, low=1)
    check_order_and_tasks(opts.get("order"), opts.get("tasks"))     # as given on the command line
    if file_opts:
        opts = {**file_opts, **opts}
    try:
        if preset:
            runs = PRESET_RUNS[preset]
            base = preset_config(preset, **opts)
            methods = methods or list(runs["methods"])
            seed_list = seed_list or list(runs["seeds"])
            jobs = jobs or runs["jobs"] or min(2, os.cpu_count() or 1)
            default_out = f"runs/{preset}"
        else:
            for k, v in MTIL_DEFAULTS.items():
                opts.setdefault(k, v)
            base = TrainConfig(**opts)
            methods = methods or ["gift"]
            seed_list = seed_list or [0]
            jobs = jobs or 1
            default_out = f"runs/{'-'.join(methods)}"
        base = dataclasses.replace(base, out=out or default_out, resume=resume, plots=not no_plots,
                                   progress=not quiet)
        cfgs = several_runs.plan_runs(base, methods, seed_list)
        _check_before_work(cfgs, base)   # every option and every run folder, before any work
        from gift_fast.distributed import current

        current().barrier()              # (torchrun) every process has checked the folders before rank 0 marks
        parent_created = _mark_parent(cfgs, base)
        try:
            several_runs.run_many(cfgs, jobs=jobs, progress=not quiet)
        except BaseException:
            from gift_fast.run_folder import remove_own_files

            remove_own_files(Path(base.out), parent_created)
            raise
        if not write_report:
            return
        text = report([c.out for c in cfgs], markdown=os.path.join(base.out, "report.md"))
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(text)
    click.echo(f"(written to {os.path.join(base.out, 'report.md')})", err=True)


def _check_before_work(cfgs, base):
    """Options of every run (ranges, combinations) and its folder (new: empty or a run, or --force), read-only."""
    from gift_fast.distributed import current
    from gift_fast.run_folder import check_new_folder, is_run_folder
    from gift_fast.validation import check_train_config

    world = current().world_size
    for c in cfgs:
        check_train_config(c, world)
        c.method_spec()          # bad method / switch combinations fail before any work
        if not is_run_folder(Path(c.out)):
            check_new_folder(Path(c.out), force=c.force)
    if len(cfgs) > 1 and not base.resume and not is_run_folder(Path(base.out)):
        # the folder of several runs: the same rule (it holds the runs' folders and report.md)
        check_new_folder(Path(base.out), force=base.force)


def _mark_parent(cfgs, base) -> bool:
    """Mark the folder that holds several runs (True when this command created it)."""
    from gift_fast.distributed import current
    from gift_fast.run_folder import mark

    if len(cfgs) <= 1 or not current().is_main:
        return False
    return mark(Path(base.out), kind="runs")


@click.command("eval")
@click.option("--preset", type=click.Choice(["tiny"]), default=None, help="Evaluate on the toy tasks.")
@click.option("--model", default=None, help="open_clip architecture or tiny model (default ViT-B-16 / toy-vit).")
@click.option("--pretrained", default=None, help="Pretrained tag or checkpoint (e.g. a run's checkpoints/*.safetensors).")
@click.option("--order", type=int, default=None, help="MTIL order 1 or 2 (default 1).")
@click.option("--tasks", default=None, help="Comma-separated task names.")
@click.option("--data-root", default=None, help=f"MTIL data sets (default {MTIL_DEFAULTS['data_root']}).")
@click.option("--data-cache", default=None, help="Decoded-image cache folder ('none' to decode every time).")
@click.option("--device", default="auto")
@click.option("--bf16", is_flag=True)
@click.option("--batch-size", type=int, default=256)
@click.option("--out", default=None, help="Write the accuracies as JSON here.")
@click.option("--quiet", is_flag=True)
def evaluate_cmd(preset, model, pretrained, order, tasks, data_root, data_cache, device, bf16, batch_size, out, quiet):
    """Zero-shot top-1 accuracy of a model (or a run's checkpoint) on every task of a sequence."""
    from gift_fast.builders import build_task_list, load_bundle
    from gift_fast.distributed import init_from_env, main_first, shutdown
    from gift_fast.evaluate import evaluate_tasks
    from gift_fast.files import atomic_write_text
    from gift_fast.precision import check_bf16
    from gift_fast.run_config import TrainConfig, preset_config
    from gift_fast.validation import check_eval_options, check_train_config

    # before any work: the values, and that --out can be written (not after the whole evaluation)
    check_eval_options(batch_size=batch_size, device=device, out=out, order=order, tasks=_csv(tasks))
    try:
        kw = dict(model=model, pretrained=pretrained, order=order, tasks=_csv(tasks), data_root=data_root,
                  device=device, bf16=bf16, progress=not quiet)
        kw = {k: v for k, v in kw.items() if v is not None}
        if (pretrained or "").lower() == "none":
            kw["pretrained"] = None
        if data_cache is not None:
            kw["data_cache"] = None if data_cache.lower() == "none" else data_cache
        if preset:
            cfg = preset_config(preset, **kw)
        else:
            kw.setdefault("data_root", MTIL_DEFAULTS["data_root"])
            kw.setdefault("data_cache", MTIL_DEFAULTS["data_cache"])
            cfg = TrainConfig(**kw)
        check_train_config(cfg)
        if cfg.pretrained and os.path.isfile(cfg.pretrained):
            from gift_fast.run_folder import verify_if_run_checkpoint

            verify_if_run_checkpoint(cfg.pretrained)   # a run's checkpoint: its recorded sha256
        from gift_fast.preflight import check_eval

        check_eval(cfg)                           # data sets, cache space, weights: before any model is loaded
        dist, dev = init_from_env(cfg.device)   # under torchrun each process scores a share of every test set
        try:
            check_bf16(dev, cfg.bf16)             # as `gift-fast train` does: a GPU without bf16 refuses --bf16
            with main_first(dist):
                bundle = load_bundle(cfg, dev)
                from gift_fast.run_folder import finite_check

                finite_check(bundle.model.named_parameters(), f"the model ({cfg.pretrained or 'random weights'})")
                task_list = build_task_list(cfg, bundle)
            accs = evaluate_tasks(bundle.model, bundle.tokenizer, task_list, device=dev, bf16=cfg.bf16,
                                  batch_size=batch_size, progress=not quiet and dist.is_main, dist=dist)
        finally:
            shutdown()
    except (ValueError, OSError, RuntimeError, FloatingPointError) as e:
        raise click.ClickException(str(e)) from None
    if not dist.is_main:
        return
    rows = {t.name: a for t, a in zip(task_list, accs)}
    width = max(len(n) for n in rows)
    for n, a in rows.items():
        click.echo(f"{n:<{width}}  {a:6.2f}")
    click.echo(f"{'mean':<{width}}  {sum(accs) / len(accs):6.2f}")
    if out:
        atomic_write_text(out, json.dumps({"model": cfg.model, "pretrained": cfg.pretrained,
                                           "activation": bundle.info.get("activation"), "accuracy": rows},
                                          indent=2) + "\n")

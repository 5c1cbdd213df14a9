"""The user's two commands resolve to the fastest measured exact configuration on CUDA (nothing compiles on
the CPU), renamed options work under both spellings, and bad setups stop before any model is loaded."""
import os
import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from gift_fast.cli.main import main
from gift_fast.synth.generators import MEASURED_COMPILED, MEASURED_EAGER, GeneratorConfig

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------ capture helpers
@pytest.fixture
def train_cfgs(monkeypatch):
    """Run `gift-fast train ...` in process up to the run: the TrainConfigs it would run."""
    import gift_fast.report
    import gift_fast.runs

    seen = []
    monkeypatch.setattr(gift_fast.runs, "run_many", lambda cfgs, **kw: seen.extend(cfgs) or [])
    monkeypatch.setattr(gift_fast.report, "report", lambda *a, **k: "")

    def run(*args):
        seen.clear()
        r = CliRunner().invoke(main, ["train", *args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return list(seen)
    return run


@pytest.fixture
def synth_run(monkeypatch, tmp_path):
    """Run `gift-fast synth ...` in process on a (mocked) device up to loading the model: what _run receives."""
    import gift_fast.cli.synth as synth_cli
    import gift_fast.preflight

    seen, device = {}, {"dev": CUDA}
    monkeypatch.setattr(synth_cli, "_run", lambda **kw: seen.update(kw))
    monkeypatch.setattr(synth_cli, "_init_distributed", lambda d: (0, 1, device["dev"]))
    monkeypatch.setattr(gift_fast.preflight, "check_sd_model", lambda model, option="--sd-model": True)

    def run(*args, dev=CUDA):
        seen.clear()
        device["dev"] = dev
        r = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "syn"), *args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return dict(seen)
    return run


# ------------------------------------------------------------------------------------------ defaults
def test_train_order1_bf16_compiles_on_cuda_not_on_cpu(train_cfgs, monkeypatch):
    from gift_fast.builders import resolve_device

    (cfg,) = train_cfgs("--order", "1", "--bf16")
    assert cfg.order == 1 and cfg.bf16 and cfg.compile is None and cfg.kernels == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    dev = resolve_device(cfg.device)
    assert dev.type == "cuda" and cfg.compiles(dev)            # regional compile: run 2's fastest step
    gen = cfg.generator_config().resolve(dev)                  # on-the-fly synthesis: run 1's fastest row
    assert gen.compile == "unet" and {k: getattr(gen, k) for k in MEASURED_COMPILED} == MEASURED_COMPILED
    assert cfg.generator_config().resolve(CPU).compile == "none"
    assert not cfg.compiles(CPU)
    (off,) = train_cfgs("--order", "1", "--bf16", "--no-compile")
    assert off.compile is False and not off.compiles(CUDA)
    (on,) = train_cfgs("--order", "1", "--compile")
    assert on.compiles(CPU)                                    # asked for: compiles anywhere


def test_synth_steps25_runs_order1_compiled_with_the_measured_settings(synth_run):
    from gift_fast.synth.engine import mtil_tasks

    got = synth_run("--steps", "25")
    g = got["gen_cfg"]
    assert got["tasks"] == mtil_tasks(1)                         # --order defaults to 1, as in train
    assert g.steps == 25 and g.compile == "unet" and g.compile_mode == "default"
    assert (g.batch_size, g.channels_last, g.fuse_qkv, g.sdpa_backend) == (32, True, True, "default")
    assert g.safety_checker and g.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    cpu = synth_run("--steps", "25", dev=CPU)["gen_cfg"]
    assert cpu.compile == "none" and cpu.batch_size == 16 and not cpu.channels_last and not cpu.fuse_qkv
    eager = synth_run("--steps", "25", "--sd-compile", "none")["gen_cfg"]
    assert {k: getattr(eager, k) for k in MEASURED_EAGER} == MEASURED_EAGER


def test_train_on_the_fly_uses_the_same_generator_config(train_cfgs, synth_run):
    flags = ["--sd-steps", "25", "--sd-batch-size", "8", "--no-sd-fused-qkv", "--sd-sdpa-backend", "flash"]
    (cfg,) = train_cfgs("--order", "1", "--synth", "on-the-fly", *flags)
    from_synth = synth_run(*flags)["gen_cfg"]
    from_train = cfg.generator_config().resolve(CUDA)
    assert from_train == from_synth
    assert from_train.batch_size == 8 and not from_train.fuse_qkv and from_train.channels_last


def test_on_the_fly_generator_is_built_from_the_config(monkeypatch, tmp_path):
    import gift_fast.preflight
    from gift_fast.distributed import SINGLE
    from gift_fast.synth.generators import StableDiffusionGenerator
    from gift_fast.replay import SyntheticReplay
    from gift_fast.train import TrainConfig

    built = {}
    monkeypatch.setattr(StableDiffusionGenerator, "from_config",
                        classmethod(lambda cls, c, device=None, local_files_only=None: built.update(c=c, d=device)
                                    or "generator"))
    monkeypatch.setattr(gift_fast.preflight, "check_sd_model", lambda model, option="--sd-model": True)
    replay = SyntheticReplay(TrainConfig(synth="on-the-fly", progress=False, sd_steps=25), device=CUDA, dist=SINGLE)
    assert replay.generator() == "generator" and replay.synth_batch_size() == 32
    assert built["c"] == GeneratorConfig(steps=25).resolve(CUDA) and built["c"].compile == "unet"


def test_resolution_rows_and_bad_values():
    assert GeneratorConfig().resolve(CUDA).batch_size == MEASURED_COMPILED["batch_size"]
    assert GeneratorConfig(compile="all", batch_size=4).resolve(CUDA).batch_size == 4
    with pytest.raises(ValueError, match="--sd-compile"):
        GeneratorConfig(compile="fast").resolve(CPU)


def test_old_run_folders_stay_resumable():
    """Fields added by the generator configuration do not change an existing run's identity."""
    import dataclasses

    from gift_fast.run_config import identity_of
    from gift_fast.train import TrainConfig

    ident = identity_of(TrainConfig())
    assert not any(k.startswith("sd_") and k not in ("sd_model", "sd_steps") for k in ident)
    assert "compile" not in ident and "synth_batch_size" not in ident
    assert identity_of(dataclasses.replace(TrainConfig(), sd_safety_checker=False))["sd_safety_checker"] is False


# ------------------------------------------------------------------------------------------ renamed options
@pytest.mark.parametrize("new,old,field,value", [
    (["--sd-steps", "25"], ["--steps", "25"], "steps", 25),
    (["--sd-model", "/models/sd15"], ["--model", "/models/sd15"], "model", "/models/sd15"),
    (["--sd-batch-size", "8"], ["--batch-size", "8"], "batch_size", 8),
    (["--sd-compile", "unet"], ["--compile"], "compile", "unet"),
    (["--sd-compile", "all"], ["--compile", "--compile-vae"], "compile", "all"),
    (["--sd-compile-mode", "reduce-overhead"], ["--compile-mode", "reduce-overhead"], "compile_mode",
     "reduce-overhead"),
    (["--sd-attention", "xformers"], ["--attention", "xformers"], "attention", "xformers"),
    (["--sd-sdpa-backend", "cudnn"], ["--sdpa-backend", "cudnn"], "sdpa_backend", "cudnn"),
    (["--no-sd-safety-checker"], ["--no-safety-checker"], "safety_checker", False),
])
def test_synth_renamed_options_new_and_old(synth_run, new, old, field, value):
    assert getattr(synth_run(*new)["gen_cfg"], field) == value
    assert getattr(synth_run(*old)["gen_cfg"], field) == value


def test_train_renamed_options_new_and_old(train_cfgs):
    (a,) = train_cfgs("--distill-batch-size", "32")
    (b,) = train_cfgs("--syn-batch-size", "32")
    assert a.syn_batch_size == b.syn_batch_size == 32
    (c,) = train_cfgs("--sd-batch-size", "8", "--sd-model", "/m", "--sd-steps", "25", "--sd-compile", "none")
    assert (c.synth_batch_size, c.sd_model, c.sd_steps, c.sd_compile) == (8, "/m", 25, "none")


def test_increments_new_and_old(monkeypatch):
    import gift_fast.cil_trainer

    seen = []
    monkeypatch.setattr(gift_fast.cil_trainer, "run_cil_command", lambda bench, opts, **kw: seen.append(opts) or "ok")
    for args in (["--increments", "10"], ["--steps", "10"]):
        r = CliRunner().invoke(main, ["train", "--benchmark", "cifar100-cil", *args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert seen[-1]["steps"] == 10
    r = CliRunner().invoke(main, ["train", "--benchmark", "cifar100-cil", "--increments", "10", "--steps", "5"])
    assert r.exit_code != 0 and "not both" in r.output
    r = CliRunner().invoke(main, ["train", "--increments", "10"])
    assert r.exit_code != 0 and "--benchmark" in r.output


def _shown(help_text, name):
    return re.search(rf"(?<![\w-]){re.escape(name)}\b", help_text) is not None


def test_help_shows_new_names_only():
    h = CliRunner().invoke(main, ["synth", "--help"]).output
    for new in ("--sd-steps", "--sd-model", "--sd-batch-size", "--sd-compile", "--sd-safety-checker",
                "--sd-sdpa-backend", "--sd-attention"):
        assert _shown(h, new), new
    for old in ("--steps", "--model", "--batch-size", "--compile", "--compile-vae", "--attention", "--sdpa-backend",
                "--no-safety-checker"):
        assert not _shown(h, old), old
    assert "default 1" in h                                      # --order
    t = CliRunner().invoke(main, ["train", "--help"]).output
    for new in ("--distill-batch-size", "--sd-batch-size", "--increments", "--sd-steps", "--sd-model",
                "--sd-compile", "--no-compile"):
        assert _shown(t, new), new
    assert not _shown(t, "--syn-batch-size")
    assert "default 1" in t


# ------------------------------------------------------------------------------------------ checks before cost
@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    from fake_datasets import make_fake_mtil_root

    root = tmp_path_factory.mktemp("mtil")
    make_fake_mtil_root(str(root / "data"), tasks=["MNIST", "EuroSAT"])
    return str(root / "data")


def _offline(tmp_path, *args, disk_free=None):
    """`gift-fast ARGS` in a subprocess: no network, an empty model cache, loaders that must not be reached."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    env.pop("HF_HUB_OFFLINE", None)
    if disk_free is not None:
        env["CLI_TEST_DISK_FREE"] = str(disk_free)
    r = subprocess.run([sys.executable, os.path.join(HERE, "cli_offline.py"), *args], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "MODEL LOADED" not in out and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out
    return errors[0]


@pytest.mark.slow
def test_missing_models_without_network_one_line_each(tmp_path, fake_data):
    tasks = ["--tasks", "MNIST,EuroSAT", "--data-root", fake_data, "--data-cache", "none"]
    line = _offline(tmp_path, "synth", "--steps", "25", "--out", str(tmp_path / "syn"))
    assert "Stable Diffusion model" in line and "--sd-model" in line and "patched: no network" in line
    line = _offline(tmp_path, "train", "--bf16", *tasks, "--synth", "on-the-fly")   # --tasks replaces --order
    assert "CLIP weights ViT-B-16 / openai" in line and "--pretrained" in line
    line = _offline(tmp_path, "eval", *tasks)
    assert "CLIP weights" in line and "--pretrained" in line


@pytest.mark.slow
def test_missing_data_and_small_disk_one_line_before_loading(tmp_path, fake_data):
    empty = tmp_path / "nodata"
    empty.mkdir()
    line = _offline(tmp_path, "train", "--order", "1", "--data-root", str(empty))    # eval: the same check_mtil_data
    assert "data sets are missing" in line and "--data-root" in line and "gift-fast data check" in line
    line = _offline(tmp_path, "train", "--tasks", "MNIST,EuroSAT", "--data-root", fake_data, "--data-cache",
                    str(tmp_path / "cache"), "--method", "finetune", disk_free=1000)
    assert "not enough disk space" in line and "--data-cache none" in line
    line = _offline(tmp_path, "synth", "--steps", "25", "--out", str(tmp_path / "syn"), disk_free=1000)
    assert "not enough disk space" in line and "--out" in line


def test_cache_is_announced_with_size_place_and_how_to_avoid_it(fake_data, tmp_path, capsys):
    from fake_datasets import relaxed_md5_checks
    from gift_fast.preflight import cache_plan, check_train
    from gift_fast.train import TrainConfig

    cache = tmp_path / "cache"
    cfg = TrainConfig(tasks=["MNIST", "EuroSAT"], data_root=fake_data, data_cache=str(cache), method="finetune",
                      model="toy-vit-test", pretrained=None, out=str(tmp_path / "run"))
    with relaxed_md5_checks():
        check_train(cfg)
    err = capsys.readouterr().err
    assert "decoded-image cache: about" in err and str(cache) in err
    assert "--data-cache DIR" in err and "--data-cache none" in err
    rows = [{"task": "MNIST", "train": 10, "test": 5}, {"task": "EuroSAT", "train": 4, "test": 2}]
    need, tasks = cache_plan(rows, str(cache))
    assert need == 21 * 3 * 224 * 224 and tasks == ["MNIST", "EuroSAT"]
    cache.mkdir()
    for part in ("train", "test"):
        (cache / f"MNIST-{part}-0123abcd.json").write_text("{}")
    assert cache_plan(rows, str(cache)) == (6 * 3 * 224 * 224, ["EuroSAT"])


def test_cached_models_need_no_network(monkeypatch, tmp_path):
    import gift_fast.preflight as pf

    monkeypatch.setattr(pf, "hub_reachable", lambda timeout=5.0: (False, "no network"))
    monkeypatch.setattr(pf, "_hf_cached", lambda repo, names: repo == "cached/sd")
    assert pf.check_sd_model("cached/sd") is True
    assert pf.check_sd_model(str(tmp_path)) is None                 # a folder: checked when loaded
    with pytest.raises(pf.ModelUnavailable, match="--sd-model"):
        pf.check_sd_model("missing/sd")
    pf.check_clip_weights("toy-vit-test", "toy")
    pf.check_clip_weights("ViT-B-16", str(tmp_path / "w.pt"))         # a file: create_clip checks it
    with pytest.raises(pf.ModelUnavailable, match="--pretrained"):
        pf.check_clip_weights("ViT-B-16", "openai")
    monkeypatch.setattr(pf, "hub_reachable", lambda timeout=5.0: (True, ""))
    assert pf.check_sd_model("missing/sd") is None                   # downloadable


def test_run_folder_space_for_checkpoints_is_checked(fake_data, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from fake_datasets import relaxed_md5_checks
    from gift_fast.preflight import check_train
    from gift_fast.train import TrainConfig

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2 ** 30, 0, 2 ** 30))     # 1 GB free
    cfg = TrainConfig(tasks=["MNIST", "EuroSAT"], data_root=fake_data, data_cache=None, method="finetune",
                      model="ViT-B-16", out=str(tmp_path / "run"))                    # 2 x 0.6 GB of checkpoints
    with relaxed_md5_checks(), pytest.raises(OSError, match="2 task checkpoints.*--keep-checkpoints last"):
        check_train(cfg)


def test_train_on_the_fly_checks_the_sd_model_before_loading(fake_data, tmp_path, monkeypatch):
    import gift_fast.preflight as pf
    from fake_datasets import relaxed_md5_checks
    from gift_fast.train import TrainConfig

    monkeypatch.setattr(pf, "hub_reachable", lambda timeout=5.0: (False, "no network"))
    cfg = TrainConfig(tasks=["MNIST", "EuroSAT"], data_root=fake_data, data_cache=None, model="toy-vit-test",
                      pretrained=None, synth="on-the-fly", out=str(tmp_path / "run"))
    with relaxed_md5_checks(), pytest.raises(pf.ModelUnavailable, match="--sd-model"):
        pf.check_train(cfg)


def test_cli_distill_choices_are_the_one_list_spelled_with_hyphens():
    """The CLI keeps its own spelling of the distillation losses (importing gift_fast.losses would load torch at
    `--help`): it must name exactly gift_fast.losses.DISTILL_MODES, and every choice must map onto one of them."""
    from gift_fast.cli.train import DISTILL_CHOICES, _distill
    from gift_fast.losses import DISTILL_MODES

    assert sorted(_distill(c) for c in DISTILL_CHOICES) == sorted(DISTILL_MODES)
    assert len(set(DISTILL_CHOICES)) == len(DISTILL_CHOICES)


def test_cli_choices_are_the_librarys_lists():
    """The CLI spells some lists out (importing their modules would load torch at `--help`); each must be the
    library's one list, so a value added in one place cannot be missing in the other."""
    import click

    from gift_fast.backends import BACKENDS
    from gift_fast.cil_trainer import CIL_BENCHMARKS
    from gift_fast.cli.synth import synth as synth_cmd
    from gift_fast.cli.train import train as train_cmd
    from gift_fast.method import CONSOLIDATIONS
    from gift_fast.run_config import PRESETS
    from gift_fast.synth.prompts import SEED_SCHEMES

    def choices(cmd, flag):
        opt = next(p for p in cmd.params if flag in p.opts)
        assert isinstance(opt.type, click.Choice), flag
        return sorted(opt.type.choices)

    assert choices(train_cmd, "--consolidation") == sorted(CONSOLIDATIONS)
    assert choices(train_cmd, "--kernels") == sorted(BACKENDS)
    assert choices(train_cmd, "--seed-scheme") == choices(synth_cmd, "--seed-scheme") == sorted(SEED_SCHEMES)
    assert choices(train_cmd, "--preset") == sorted(PRESETS)
    assert choices(train_cmd, "--benchmark") == sorted(("mtil",) + tuple(CIL_BENCHMARKS))

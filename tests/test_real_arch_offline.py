"""The real architectures end to end, offline: CLIP ViT-B/16 through open_clip's ``openai`` tag and the
Stable Diffusion 1.5 architecture, both with random weights from local files, on a few images of a data
set in torchvision's own layout. Synthesize, train a step, evaluate, reload the checkpoint, evaluate again.

Every other test uses tiny stand-in models; this one runs the networks the paper uses, so that what only
they have (QuickGELU from the ``openai`` tag, open_clip's Hugging Face download path, the SD-1.5 pipeline
folder, 224 px inputs) is exercised. Nothing is downloaded: the ``openai`` weights come from a Hugging Face
cache built here (HF_HOME in a temporary folder, HF_HUB_OFFLINE=1), laid out as the hub client stores
``timm/vit_base_patch16_clip_224.openai``'s ``open_clip_model.safetensors`` (the file open_clip 3.3 asks
for first for ViT-B-16 / openai); the SD-1.5 folder is the pipeline ``save_pretrained`` writes (fp16
weights, half the bytes), generating 64 x 64 images in one step.
"""
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow

# open_clip 3.3: get_pretrained_cfg("ViT-B-16", "openai")["hf_hub"] == "timm/vit_base_patch16_clip_224.openai/";
# download_pretrained_from_hf tries "open_clip_model.safetensors" before "open_clip_pytorch_model.bin".
OPENAI_HF_REPO = "timm/vit_base_patch16_clip_224.openai"
OPENAI_HF_FILE = "open_clip_model.safetensors"
TASK = "MNIST"            # 10 classes, one template: the zero-shot classifier stays cheap on a CPU


def test_open_clip_still_reads_the_openai_tag_from_that_hub_file():
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg("ViT-B-16", "openai")
    assert cfg["hf_hub"].rstrip("/") == OPENAI_HF_REPO and cfg["quick_gelu"] is True
    assert HF_SAFE_WEIGHTS_NAME == OPENAI_HF_FILE


def _hf_cache_with_random_openai_weights(hf_home):
    """HF_HOME/hub as huggingface_hub lays it out: refs/main names a snapshot holding the file."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    repo = hf_home / "hub" / ("models--" + OPENAI_HF_REPO.replace("/", "--"))
    commit = hashlib.sha1(b"gift-fast random ViT-B-16").hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    save_file(state, str(snap / OPENAI_HF_FILE))


def _sd15_folder(path):
    from gift_fast.synth.generators import random_pipeline

    pipe = random_pipeline("sd15", dtype=torch.float16, seed=0)
    pipe.save_pretrained(str(path), safe_serialization=True)


def _cli(args, env, timeout=600):
    res = subprocess.run([sys.executable, "-m", "gift_fast.cli.main", *args], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, f"gift-fast {' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


def test_vit_b16_openai_and_sd15_offline_end_to_end(tmp_path):
    from fake_datasets import make_fake_mtil_root
    from gift_fast.data.mtil import classnames

    seconds = {}
    t0 = time.perf_counter()

    def lap(name):
        nonlocal t0
        now = time.perf_counter()
        seconds[name] = round(now - t0, 1)
        t0 = now

    hf_home = tmp_path / "hf"
    _hf_cache_with_random_openai_weights(hf_home)
    lap("hf cache: random ViT-B-16, fp16 safetensors")
    _sd15_folder(tmp_path / "sd15")
    lap("SD-1.5 folder: random weights, fp16")
    data = tmp_path / "data"
    make_fake_mtil_root(str(data), tasks=[TASK])
    task_file = tmp_path / "tasks.json"
    task_file.write_text(json.dumps({"tasks": [{"name": TASK, "classnames": classnames(TASK)}]}))
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", GIFT_FAST_CACHE=str(tmp_path / "gift_cache"), OMP_NUM_THREADS="2")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)

    # 1. synthesize: the SD-1.5 architecture from the local folder, 2 images of 64 x 64, one step
    syn = tmp_path / "synthetic"
    _cli(["synth", "--task-file", str(task_file), "--model", str(tmp_path / "sd15"), "--images-per-task", "2",
          "--steps", "1", "--height", "64", "--width", "64", "--batch-size", "2", "--device", "cpu",
          "--dtype", "fp32", "--no-safety-checker", "--out", str(syn), "--quiet"], env)
    assert (syn / f"{TASK}_Syn" / "image_text.csv").is_file()
    lap("gift-fast synth (2 images, 64 px, 1 step)")

    # 2. train one GIFT step on ViT-B/16 from the `openai` tag (evaluates before and after the task)
    run = tmp_path / "run"
    common = ["--model", "ViT-B-16", "--tasks", TASK, "--data-root", str(data), "--data-cache",
              str(tmp_path / "cache"), "--device", "cpu"]
    _cli(["train", *common, "--pretrained", "openai", "--synth", str(syn), "--images-per-task", "2",
          "--steps", "1", "--warmup", "1", "--batch-size", "2", "--distill-batch-size", "2", "--num-workers", "0",
          "--eval-batch-size", "64", "--threads", "2", "--no-plots", "--quiet", "--out", str(run)], env)
    lap("gift-fast train (1 step, 2 evaluations)")
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["activation"] == "quick_gelu" and config["model"]["pretrained"] == "openai"
    state = json.loads((run / "state.json").read_text())
    ckpt = run / state["checkpoints"][-1]
    from gift_fast.checkpoints import checkpoint_metadata
    assert checkpoint_metadata(ckpt)["architecture"] == {"quick_gelu": True}

    # 3. evaluate the reloaded checkpoint in a new process: the run's numbers, exactly
    after = tmp_path / "after.json"
    _cli(["eval", *common, "--pretrained", str(ckpt), "--batch-size", "64", "--quiet", "--out", str(after)], env)
    lap("gift-fast eval of the checkpoint")
    after = json.loads(after.read_text())
    assert after["activation"] == "quick_gelu"
    assert after["accuracy"][TASK] == state["acc"][-1][0]
    print("seconds per stage:", seconds)

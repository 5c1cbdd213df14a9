"""The tiny continual run that the trainer's tests share: a fixed random toy CLIP as the 'pre-trained'
model and a two-task toy configuration small enough for a CPU test (each file overrides what it studies)."""
import torch

from gift_fast.checkpoints import save_model
from gift_fast.models import create_clip
from gift_fast.train import TrainConfig


def init_checkpoint(tmp_path_factory, seed: int) -> str:
    """A fixed random tiny CLIP saved once per test module (every run of the module starts from it)."""
    torch.manual_seed(seed)
    m = create_clip("toy-vit-test", None).model
    return str(save_model(m, tmp_path_factory.mktemp("init") / "init.safetensors"))


def toy_run_config(out, init_ckpt: str, **kw) -> TrainConfig:
    base = dict(out=str(out), model="toy-vit-test", pretrained=init_ckpt, toy=True,
                tasks=["ToyShapes", "ToyColours"], toy_train_size=40, toy_test_size=20, steps=2, batch_size=8,
                syn_batch_size=6, warmup=2, lr=1e-3, synth="on-the-fly", generator="toy", images_per_task=10,
                log_every=1, device="cpu", progress=False, num_workers=0, plots=False, eval_batch_size=64,
                kernels="torch", keep_synth=True)
    base.update(kw)
    return TrainConfig(**base)

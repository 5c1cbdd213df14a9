"""The Stable Diffusion generator's options, one set for ``gift-fast synth`` and ``gift-fast train``.

Both commands build the same ``GeneratorConfig`` (``gift_fast.synth.generators``) from
the same ``--sd-*`` options, so a setting is spelled the same way wherever images are
generated. Speed options default to "auto": the fastest exact configuration measured
(``bench/RESULTS.md``) on CUDA, plain eager on the CPU.
"""
from __future__ import annotations

import click

COMPILE_CHOICES = ["auto", "none", "unet", "all"]
SDPA_CHOICES = ["auto", "default", "cudnn", "flash", "efficient"]

# option dest -> GeneratorConfig field
FIELDS = {"sd_model": "model", "sd_steps": "steps", "sd_batch_size": "batch_size", "sd_compile": "compile",
          "sd_compile_mode": "compile_mode", "sd_channels_last": "channels_last", "sd_fused_qkv": "fuse_qkv",
          "sd_attention": "attention", "sd_sdpa_backend": "sdpa_backend", "sd_safety_checker": "safety_checker"}


def sd_options(steps_help: str):
    """Decorator adding the generator's options (all default None: "not given")."""
    opts = [
        click.option("--sd-model", default=None, help="Stable Diffusion pipeline: Hub id or local diffusers folder "
                     "(default stable-diffusion-v1-5/stable-diffusion-v1-5; without network: a folder)."),
        click.option("--sd-steps", type=int, default=None, help=steps_help),
        click.option("--sd-batch-size", type=int, default=None, help="Images per generator call (default: 32 "
                     "compiled on CUDA, 16 eager; as measured in bench/RESULTS.md)."),
        click.option("--sd-compile", type=click.Choice(COMPILE_CHOICES), default=None,
                     help="torch.compile the UNet (unet), UNet and VAE decoder (all), or nothing (none). Default "
                     "auto: unet on CUDA (the fastest measured), none on the CPU."),
        click.option("--sd-compile-mode", default=None, help="torch.compile mode (default 'default', as measured; "
                     "reduce-overhead, max-autotune-no-cudagraphs, ...)."),
        click.option("--sd-channels-last/--no-sd-channels-last", "sd_channels_last", default=None,
                     help="UNet and VAE in channels_last (default: on when compiled, off in eager, as measured)."),
        click.option("--sd-fused-qkv/--no-sd-fused-qkv", "sd_fused_qkv", default=None,
                     help="Fused QKV projections of the UNet's attention (default: on when compiled, off in eager)."),
        click.option("--sd-attention", type=click.Choice(["auto", "sdpa", "xformers"]), default=None,
                     help="sdpa: PyTorch SDPA (default); xformers: only if its CUDA operators work here."),
        click.option("--sd-sdpa-backend", type=click.Choice(SDPA_CHOICES), default=None,
                     help="SDPA kernel preference (default 'default', the measured fastest; auto: timed on the UNet)."),
        click.option("--sd-safety-checker/--no-sd-safety-checker", "sd_safety_checker", default=None,
                     help="Run the pipeline's safety checker; flagged images are regenerated (default on, as the "
                     "reference)."),
    ]

    def deco(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


def merge_alias(new_name: str, new, old_name: str, old):
    """The value of an option given under its new or its old (hidden) spelling; both and different: an error."""
    if old is None:
        return new
    if new is not None and new != old:
        raise click.UsageError(f"{old_name} is the old spelling of {new_name}: give one of them")
    return old


def generator_fields(opts: dict) -> dict:
    """GeneratorConfig keyword arguments from the ``--sd-*`` option values that were given (pops them)."""
    out = {}
    for dest, field in FIELDS.items():
        v = opts.pop(dest, None)
        if v is not None:
            out[field] = v
    return out

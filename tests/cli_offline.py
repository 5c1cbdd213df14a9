"""Run ``gift-fast`` with the outside world patched: ``python tests/cli_offline.py ARGS...``.

* no network: ``gift_fast.preflight.hub_reachable`` answers "unreachable";
* ``CLI_TEST_DISK_FREE=N``: ``shutil.disk_usage`` reports N free bytes;
* every model loader (open_clip, CLIP bundle, Stable Diffusion pipeline) prints
  ``MODEL LOADED`` and exits 99, so a test can prove nothing was loaded first;
* torchvision's md5 checks accept the fake data sets of ``tests/fake_datasets.py``.
"""
import os
import shutil
import sys
from collections import namedtuple


def main():
    import gift_fast.preflight as preflight

    preflight.hub_reachable = lambda timeout=5.0: (False, "patched: no network")
    free = os.environ.get("CLI_TEST_DISK_FREE")
    if free is not None:
        usage = namedtuple("usage", "total used free")
        shutil.disk_usage = lambda path: usage(int(free), 0, int(free))

    def loaded(*a, **k):
        print("MODEL LOADED", file=sys.stderr, flush=True)
        os._exit(99)

    import gift_fast.models as models
    models.create_clip = loaded
    import open_clip
    open_clip.create_model_and_transforms = loaded
    from gift_fast.synth.generators import StableDiffusionGenerator
    StableDiffusionGenerator.from_pretrained = classmethod(loaded)
    from fake_datasets import relaxed_md5_checks
    from gift_fast.cli.main import main as cli

    with relaxed_md5_checks():
        cli(prog_name="gift-fast")


if __name__ == "__main__":
    main()

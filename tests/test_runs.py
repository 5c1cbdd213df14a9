"""gift_fast.runs: several runs in worker processes."""
import os

import pytest

from gift_fast import runs
from gift_fast.run_config import TrainConfig


def die_in_worker(cfg_dict):
    """Stands for a run whose worker process dies outright (SIGKILL, the OOM killer): no Python error."""
    os._exit(3)


def test_a_worker_that_dies_is_reported_as_a_sentence_naming_the_fix(tmp_path, monkeypatch):
    # the pool pickles the run function by name: the spawned workers import this module and call die_in_worker
    monkeypatch.setattr(runs, "_run_config", die_in_worker)
    cfgs = [TrainConfig(out=str(tmp_path / f"run{k}"), model="toy-vit", pretrained=None, toy=True, order=None)
            for k in range(2)]
    with pytest.raises(ChildProcessError, match=r"a worker process died .*none yet.*--resume.*--jobs 1"):
        runs.run_many(cfgs, jobs=2, progress=False)
    assert isinstance(ChildProcessError(), OSError)     # so the CLI prints it as one line (cli/main.py)

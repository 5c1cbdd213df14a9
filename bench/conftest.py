"""Shared benchmark setup: benchmarks need CUDA (the CPU says nothing about GPU speed).

Run on the GPU machine, e.g.:
    python -P -m pytest bench/bench_contrastive_distill.py --benchmark-json=out.json
"""
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or os.environ.get("GIFT_FAST_BENCH_CPU") == "1":
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA device (set GIFT_FAST_BENCH_CPU=1 for a CPU smoke run)")
    for item in items:
        item.add_marker(skip)

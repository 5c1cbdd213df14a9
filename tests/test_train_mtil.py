"""The MTIL path of the loop (build_tasks, DataLoader and cached fast path) on fake data-set folders."""
import pytest

from gift_fast.train import TrainConfig, train


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    from gift_fast.data.fake_mtil import make_fake_mtil_root

    root = tmp_path_factory.mktemp("mtil")
    make_fake_mtil_root(str(root / "data"), tasks=["MNIST", "EuroSAT"])
    return root


@pytest.mark.parametrize("method, synth, cached", [("finetune", None, False), ("gift", "on-the-fly", True)])
def test_mtil_tasks_train_and_evaluate(fake_root, tmp_path, method, synth, cached):
    from gift_fast.data.fake_mtil import relaxed_md5_checks

    cfg = TrainConfig(out=str(tmp_path / "run"), model="toy-vit-test", pretrained=None, tasks=["MNIST", "EuroSAT"],
                      data_root=str(fake_root / "data"), data_cache=str(fake_root / "cache") if cached else None,
                      method=method, synth=synth, generator="toy", images_per_task=8, steps=2, batch_size=4,
                      syn_batch_size=4, warmup=1, device="cpu", progress=False, num_workers=0, plots=False)
    with relaxed_md5_checks():
        metrics = train(cfg)
    rows = (tmp_path / "run" / "acc_matrix.csv").read_text().splitlines()
    assert rows[0] == "after,MNIST,EuroSAT" and len(rows) == 4
    assert metrics["tasks"] == ["MNIST", "EuroSAT"] and 0.0 <= metrics["last"] <= 100.0
    conf = (tmp_path / "run" / "config.json").read_text()
    assert '"task_lrs"' in conf


def test_mtil_default_learning_rates_follow_the_protocol(fake_root, tmp_path):
    import json

    from gift_fast.data.fake_mtil import relaxed_md5_checks

    cfg = TrainConfig(out=str(tmp_path / "run"), model="toy-vit-test", pretrained=None, tasks=["MNIST", "EuroSAT"],
                      data_root=str(fake_root / "data"), data_cache=None, method="finetune", steps=1, batch_size=4,
                      warmup=1, device="cpu", progress=False, num_workers=0, plots=False)
    with relaxed_md5_checks():
        train(cfg)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["task_lrs"] == [5e-5, 1e-5]

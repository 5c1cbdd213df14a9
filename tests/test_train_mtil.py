"""The MTIL path of the loop (build_tasks, DataLoader and cached fast path) on fake data-set folders."""
import pytest

from gift_fast.train import TrainConfig, train


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    from fake_datasets import make_fake_mtil_root

    root = tmp_path_factory.mktemp("mtil")
    make_fake_mtil_root(str(root / "data"), tasks=["MNIST", "EuroSAT"])
    return root


@pytest.mark.parametrize("method, synth, cached", [("finetune", None, False), ("gift", "on-the-fly", True)])
def test_mtil_tasks_train_and_evaluate(fake_root, tmp_path, method, synth, cached):
    from fake_datasets import relaxed_md5_checks

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

    from fake_datasets import relaxed_md5_checks

    cfg = TrainConfig(out=str(tmp_path / "run"), model="toy-vit-test", pretrained=None, tasks=["MNIST", "EuroSAT"],
                      data_root=str(fake_root / "data"), data_cache=None, method="finetune", steps=1, batch_size=4,
                      warmup=1, device="cpu", progress=False, num_workers=0, plots=False)
    with relaxed_md5_checks():
        train(cfg)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["task_lrs"] == [5e-5, 1e-5]


@pytest.mark.parametrize("flag, layout", [("--train-augment", "train-crop"), ("--no-train-augment", "center-crop")])
def test_train_augment_switch_reaches_the_training_cache(fake_root, tmp_path, flag, layout):
    """The training split is cached for the random crops by default; --no-train-augment keeps the eval transform."""
    import glob
    import json

    from click.testing import CliRunner

    from gift_fast.cli.main import main
    from fake_datasets import relaxed_md5_checks

    cache = tmp_path / "cache"
    with relaxed_md5_checks():
        res = CliRunner().invoke(main, ["train", "--model", "toy-vit-test", "--pretrained", "none", "--tasks", "MNIST",
                                        "--data-root", str(fake_root / "data"), "--data-cache", str(cache), flag,
                                        "--method", "finetune", "--steps", "1", "--batch-size", "4", "--warmup", "1",
                                        "--device", "cpu", "--num-workers", "0", "--no-plots", "--quiet",
                                        "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    conf = json.loads((tmp_path / "run" / "config.json").read_text())
    assert conf["config"]["train_augment"] is (layout == "train-crop")
    (train_meta,) = glob.glob(str(cache / "MNIST-train-*.json"))
    (test_meta,) = glob.glob(str(cache / "MNIST-test-*.json"))
    assert json.load(open(train_meta))["layout"] == layout
    assert json.load(open(test_meta))["layout"] == "center-crop"

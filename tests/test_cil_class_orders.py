"""Library data instead of hand-kept copies: timm's ImageNet metadata (parity with the 3,155-line copy it
replaces), ZSCL's class orders as the defaults (parity with ZSCL's files), --class-order FILE, and old run
folders (started on seed:1993) resumed on their recorded order."""
import hashlib
import json
from pathlib import Path

import pytest

from gift_fast.data import cil as dcil
from fake_datasets import make_fake_cifar100_root, relaxed_md5_checks

FIXTURES = Path(__file__).parent / "fixtures" / "zscl"

# sha256 of "\n".join(...) of what the removed gift_fast/data/cil_metadata.py held (generated from timm's
# _info files): IMAGENET_WNIDS, and "lemmas: gloss" of IMAGENET_LEMMAS / IMAGENET_GLOSSES.
OLD_WNIDS_SHA256 = "385e0240499426c022b773be1ae4da780f057b89c9694c7f47199f62746b6edd"
OLD_DESCRIPTIONS_SHA256 = "2029d023be3a462bfd8063b847b7d54271a95838f67ba26e6afaba0c4ee30267"


def _sha(xs):
    return hashlib.sha256("\n".join(xs).encode()).hexdigest()


def test_timm_imagenet_metadata_equals_the_removed_copy():
    assert _sha(dcil.imagenet_wnids()) == OLD_WNIDS_SHA256
    assert _sha(dcil.imagenet_descriptions()) == OLD_DESCRIPTIONS_SHA256
    w = dcil.imagenet_wnids()
    assert len(w) == 1000 and w[0] == "n01440764" and w == sorted(w)


def test_zscl_orders_equal_zscl_files():
    for dataset, name in (("CIFAR100", "cifar100.yaml"), ("TinyImageNet", "tinyimagenet.yaml")):
        from_file = dcil.read_class_order_file(str(FIXTURES / name))
        assert tuple(from_file) == dcil.ZSCL_CLASS_ORDERS[dataset]
        assert sorted(from_file) == list(range(len(from_file)))
    assert dcil.class_order(100, "zscl") == list(dcil.ICARL_CIFAR100_ORDER)   # ZSCL's CIFAR100 order is iCaRL's
    assert dcil.class_order(200, "zscl")[:4] == [131, 181, 22, 172]
    with pytest.raises(ValueError, match="ZSCL has class orders"):
        dcil.class_order(10, "zscl")


def test_read_class_order_file_formats_and_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"class_order": [2, 0, 1]}))
    (tmp_path / "b.json").write_text("[1, 2, 0]")
    (tmp_path / "c.yaml").write_text("class_order: [0, 2, 1]\n")
    (tmp_path / "bad.yaml").write_text("class_order: [a, b]\n")
    (tmp_path / "broken.json").write_text("{")
    assert dcil.read_class_order_file(str(tmp_path / "a.json")) == [2, 0, 1]
    assert dcil.read_class_order_file(str(tmp_path / "b.json")) == [1, 2, 0]
    assert dcil.read_class_order_file(str(tmp_path / "c.yaml")) == [0, 2, 1]
    with pytest.raises(ValueError, match="bad.yaml: expected class_order"):
        dcil.read_class_order_file(str(tmp_path / "bad.yaml"))
    with pytest.raises(ValueError, match="broken.json: cannot parse"):
        dcil.read_class_order_file(str(tmp_path / "broken.json"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        dcil.read_class_order_file(str(tmp_path / "nope.yaml"))


def test_parse_class_order():
    from gift_fast.cil_trainer import CILConfig, parse_class_order

    assert CILConfig("cifar100-cil", 10).class_order == "zscl"
    assert parse_class_order("zscl") == ("zscl", None)
    assert parse_class_order("orders/mine.yaml") == ("file", "orders/mine.yaml")
    with pytest.raises(ValueError, match="zscl .*the default"):
        parse_class_order("shuffled")


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cil_orders_data"))
    make_fake_cifar100_root(root, train_per_class=1, test_per_class=1)
    return root


@pytest.fixture(scope="module")
def bundle():
    import torch

    from gift_fast.models import create_clip

    torch.manual_seed(0)
    return create_clip("toy-vit-test", None, device="cpu")


def _cfg(out, root, **kw):
    from gift_fast.train import TrainConfig

    base = dict(out=str(out), model="toy-vit-test", pretrained=None, order=None, data_root=root, data_cache=None,
                method="finetune", synth=None, batch_size=8, device="cpu", num_workers=0, eval_batch_size=128,
                progress=False, plots=False, warmup=1, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_default_and_file_orders_are_recorded(fake_root, bundle, tmp_path):
    from gift_fast.cil_trainer import CILConfig, CILTrainer

    with relaxed_md5_checks():
        tr = CILTrainer(_cfg(tmp_path / "z", fake_root), CILConfig("cifar100-cil", 2, iterations=1), bundle=bundle)
    rec = json.loads((tmp_path / "z" / "cil-split.json").read_text())
    assert rec["order_rule"] == "zscl" and rec["class_order"] == list(dcil.ICARL_CIFAR100_ORDER)
    assert rec["class_order_source"] == "ZSCL cil/class_orders/cifar100.yaml"
    assert tr.bench.split.step_classes[0] == list(dcil.ICARL_CIFAR100_ORDER[:50])
    mine = list(range(99, -1, -1))
    (tmp_path / "mine.yaml").write_text("class_order: " + json.dumps(mine) + "\n")
    with relaxed_md5_checks():
        CILTrainer(_cfg(tmp_path / "f", fake_root),
                   CILConfig("cifar100-cil", 2, iterations=1, class_order=str(tmp_path / "mine.yaml")), bundle=bundle)
    rec = json.loads((tmp_path / "f" / "cil-split.json").read_text())
    assert rec["class_order"] == mine and rec["class_order_source"] == f"file {tmp_path / 'mine.yaml'}"


def test_old_run_folder_resumes_on_its_recorded_order(fake_root, bundle, tmp_path):
    """A run started when seed:1993 was the default: --resume without --class-order takes the recorded
    order (recorded_class_order); the new default on that folder is refused with the reason."""
    from gift_fast.cil_trainer import CILConfig, CILTrainer, recorded_class_order

    out = tmp_path / "old"
    with relaxed_md5_checks():
        CILTrainer(_cfg(out, fake_root), CILConfig("cifar100-cil", 2, iterations=1, class_order="seed:1993"),
                   bundle=bundle).run()
        assert recorded_class_order(str(out)) == "seed:1993"
        assert recorded_class_order(str(tmp_path)) == "seed:1993"          # a folder of run folders
        assert recorded_class_order(str(tmp_path / "none")) is None
        again = CILTrainer(_cfg(out, fake_root, resume=True),
                           CILConfig("cifar100-cil", 2, iterations=1, class_order=recorded_class_order(str(out))),
                           bundle=bundle).run()
        assert again["avg"] is not None
        with pytest.raises(ValueError, match="differs from the one recorded"):
            CILTrainer(_cfg(out, fake_root, resume=True), CILConfig("cifar100-cil", 2, iterations=1), bundle=bundle)

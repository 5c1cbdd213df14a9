"""--config FILE: a run's own config.json reruns it (same identity, same accuracy matrix); the authors'
configs/mtil_order_I.json / _II.json parse into the right options; unknown keys are named."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gift_fast.cli.main import main
from gift_fast.run_config import from_authors_config, load_config_file
from gift_fast.run_config import identity_of
from gift_fast.train import TrainConfig

FIXTURES = Path(__file__).parent / "fixtures" / "gift_cl"


def _cfg(kw, method, seed):
    return TrainConfig(**kw, method=method or "gift", seed=seed or 0)


def test_authors_order_I_is_gift_order_1():
    kw, method, seed = load_config_file(FIXTURES / "mtil_order_I.json")
    assert method == "gift" and seed is None
    assert kw == {"name": "mtil_order_I"}          # everything else is the paper's setting = the defaults
    cfg = _cfg(kw, method, seed)
    assert identity_of(cfg) == identity_of(TrainConfig())
    assert cfg.method_spec().label() == "gift" and cfg.steps == 1000 and cfg.label_smoothing == 0.2
    assert cfg.ita_weight == 0.25 and cfg.cd_weight == 1.0 and cfg.l2 == 1.0 and cfg.lr is None


def test_authors_order_II():
    kw, method, _ = load_config_file(FIXTURES / "mtil_order_II.json")
    assert method == "gift" and kw == {"order": 2, "name": "mtil_order_II"}
    assert identity_of(_cfg(kw, method, 0)) == identity_of(TrainConfig(order=2))


def _authors(**changes):
    with open(FIXTURES / "mtil_order_I.json") as fh:
        data = json.load(fh)
    data.update(changes)
    for k in [k for k, v in changes.items() if v is None and k in ("awc", "ref_model")]:
        data.pop(k)
    return data


@pytest.mark.parametrize("changes, expected, label", [
    (dict(awc=None), dict(method="l2", cd=True, ita=True), "l2 +CD +ITA"),                  # Tab. 3 / 4 base
    (dict(awc=None, distill="0", ita="0"), dict(method="l2"), "l2"),                       # the L2 baseline
    (dict(awc=None, distill="0", ita="0", L2="0"), dict(method="finetune"), "finetune"),
    (dict(awc=None, ita="0"), dict(method="l2", cd=True), "l2 +CD"),
    (dict(static_awc=4), dict(method="ewc-v", fisher_batches=4), "ewc-v"),
    (dict(awc=None, feature_mse=True, ita="0"), dict(method="l2", cd=True, distill="feature"),
     "l2 +CD distill=feature"),
    (dict(awc=None, ablate_image_only=True), dict(method="l2", cd=True, ita=True, distill="image-only"),
     "l2 +CD +ITA distill=image-only"),
    (dict(awc=None, ref_model="merge:0.2"), dict(method="l2", cd=True, ita=True, teacher="wise:0.2"),
     "l2 +CD +ITA teacher=wise:0.2"),
    (dict(iterations="500", label_smoothing="0.1", ita="1", image_nums=3000),
     dict(method="gift", steps=500, label_smoothing=0.1, ita_weight=1.0, images_per_task=3000), "gift"),
    (dict(learning_rate=["1e-5"] * 11), dict(method="gift", lr=1e-5), "gift"),
])
def test_authors_keys_map(changes, expected, label):
    kw = from_authors_config(_authors(**changes))
    kw.pop("name")
    assert kw == expected
    method = kw.pop("method")
    assert TrainConfig(**kw, method=method).method_spec().label() == label


def test_authors_errors():
    with pytest.raises(ValueError, match=r"unknown key\(s\) batch_sz, foo"):
        from_authors_config(_authors(foo=1, batch_sz=3), source="x.json")
    with pytest.raises(ValueError, match=r"we \(weight ensembling"):
        from_authors_config(_authors(we=True))
    with pytest.raises(ValueError, match="eval_dataset"):
        from_authors_config(_authors(eval_dataset=["MNIST"]))
    with pytest.raises(ValueError, match="neither one rate nor the paper's per-task rule"):
        from_authors_config(_authors(learning_rate=["1e-5", "2e-5"] + ["1e-5"] * 9))
    with pytest.raises(ValueError, match="cross_entropy"):
        from_authors_config(_authors(train_loss="focal"))
    reordered = _authors(train_dataset=["MNIST", "DTD"], eval_dataset=["MNIST", "DTD"],
                         learning_rate=["5e-5", "1e-5"])
    assert from_authors_config(reordered)["tasks"] == ["MNIST", "DTD"]


def test_run_config_unknown_keys_named(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"config": {"steps": 3, "stepz": 4, "lr_x": 1}}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) lr_x, stepz"):
        load_config_file(p)
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_config_file(p)
    with pytest.raises(FileNotFoundError, match="--config .*nope.json: no such file"):
        load_config_file(tmp_path / "nope.json")


def _tiny(out, *extra):
    return ["train", "--preset", "tiny", "--method", "gift", "--seeds", "0", "--tasks", "ToyShapes,ToyDigits",
            "--steps", "6", "--warmup", "2", "--batch-size", "16", "--syn-batch-size", "16",
            "--images-per-task", "32", "--log-every", "3", "--no-plots", "--quiet", "--out", str(out), *extra]


@pytest.mark.slow
def test_config_round_trip_on_the_tiny_preset(tmp_path):
    """A run started from another run's config.json: the same identity and the same accuracy matrix;
    a command-line option overrides the file."""
    r = CliRunner().invoke(main, _tiny(tmp_path / "a"), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "a" / "config.json"), "--out",
                                  str(tmp_path / "b"), "--quiet", "--no-plots"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    state = {k: json.loads((tmp_path / k / "state.json").read_text()) for k in "ab"}
    assert state["a"]["identity"] == state["b"]["identity"]
    assert (tmp_path / "a" / "acc_matrix.csv").read_text() == (tmp_path / "b" / "acc_matrix.csv").read_text()
    # the command line wins over the file
    r = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "a" / "config.json"), "--out",
                                  str(tmp_path / "c"), "--steps", "3", "--quiet", "--no-plots"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    ident_c = json.loads((tmp_path / "c" / "state.json").read_text())["identity"]
    assert ident_c["steps"] == 3 and {k: v for k, v in ident_c.items() if k != "steps"} == \
        {k: v for k, v in state["a"]["identity"].items() if k != "steps"}


def test_config_cli_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_dataset": ["Aircraft"], "fancy": 1}))
    r = CliRunner().invoke(main, ["train", "--config", str(bad), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "unknown key(s) fancy" in r.output
    r = CliRunner().invoke(main, ["train", "--config", str(bad), "--preset", "tiny"])
    assert r.exit_code != 0 and "drop --preset" in r.output

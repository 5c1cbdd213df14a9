"""Run folders and configs written before ``l2`` became ``consolidation_weight`` and the distillation losses got
one (underscore) spelling still resume and still load."""
import json

import pytest

from gift_fast.run_config import TrainConfig, identity_differences, identity_of, load_config_file
from gift_fast.train import ContinualTrainer
from toy_runs import init_checkpoint, toy_run_config


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    return init_checkpoint(tmp_path_factory, seed=321)


class Crash(ContinualTrainer):
    def train_task(self, t):
        if t == 1:
            raise KeyboardInterrupt("simulated Ctrl-C in task 2")
        return super().train_task(t)


def _as_the_old_code_wrote(fields):
    """TrainConfig fields as gift-fast wrote them before the rename: "l2", hyphen spellings."""
    out = {("l2" if k == "consolidation_weight" else k): v for k, v in fields.items()}
    if out.get("distill") in ("image_only", "text_only"):
        out["distill"] = out["distill"].replace("_", "-")
    return out


def test_old_names_are_accepted_and_read_as_the_new_ones():
    cfg = TrainConfig(l2=3.0, distill="image-only")
    assert cfg.consolidation_weight == 3.0 and cfg.l2 == 3.0 and cfg.distill == "image_only"
    assert identity_of(cfg) == identity_of(TrainConfig(consolidation_weight=3.0, distill="image_only"))
    assert "l2" not in identity_of(cfg) and identity_of(cfg)["consolidation_weight"] == 3.0
    assert cfg.method_spec().label() == "gift distill=image-only"          # tables keep their spelling
    old = _as_the_old_code_wrote(json.loads(json.dumps(identity_of(cfg))))
    assert "l2" in old and old["distill"] == "image-only"
    assert identity_differences(old, cfg) == []
    assert identity_differences(old, TrainConfig(l2=2.0, distill="image-only")) == [
        "consolidation_weight: 3.0 -> 2.0"]
    with pytest.raises(TypeError, match="not both"):
        TrainConfig(l2=1.0, consolidation_weight=2.0)


def test_an_old_config_json_reruns(tmp_path):
    p = tmp_path / "config.json"
    fields = _as_the_old_code_wrote({"steps": 3, "consolidation_weight": 0.5, "distill": "text_only",
                                     "method": "l2", "cd": True})
    p.write_text(json.dumps({"config": fields}))
    kw, method, _ = load_config_file(p)
    cfg = TrainConfig(**kw, method=method)
    assert cfg.consolidation_weight == 0.5 and cfg.distill == "text_only" and cfg.steps == 3


def test_a_run_folder_written_before_the_rename_resumes(tmp_path, init_ckpt):
    kw = dict(tasks=["ToyShapes", "ToyColours"], distill="image_only", consolidation_weight=2.0)
    full = ContinualTrainer(toy_run_config(tmp_path / "a", init_ckpt, **kw)).run()
    cfg = toy_run_config(tmp_path / "b", init_ckpt, **kw)
    with pytest.raises(KeyboardInterrupt):
        Crash(cfg).run()
    # state.json and config.json as the old code wrote them
    folder = tmp_path / "b"
    state = json.loads((folder / "state.json").read_text())
    state["identity"] = _as_the_old_code_wrote(state["identity"])
    (folder / "state.json").write_text(json.dumps(state))
    config = json.loads((folder / "config.json").read_text())
    config["config"] = _as_the_old_code_wrote(config["config"])
    config["method"]["distill"] = "image-only"
    (folder / "config.json").write_text(json.dumps(config))
    # resumed with the old spellings, as an old command line or script would give them
    old_cfg = toy_run_config(folder, init_ckpt, tasks=kw["tasks"], distill="image-only", l2=2.0, resume=True)
    resumed = ContinualTrainer(old_cfg).run()
    assert resumed["avg"] == pytest.approx(full["avg"]) and resumed["last"] == pytest.approx(full["last"])
    # a changed strength is still refused, named with today's name
    with pytest.raises(ValueError, match="consolidation_weight: 2.0 -> 1.0"):
        state = json.loads((folder / "state.json").read_text())
        state["finished"] = 1
        state["acc"] = state["acc"][:1]
        state["checkpoints"] = state["checkpoints"][:1]
        (folder / "metrics.json").unlink()
        (folder / "state.json").write_text(json.dumps(state))
        ContinualTrainer(toy_run_config(folder, init_ckpt, tasks=kw["tasks"], distill="image-only",
                                        resume=True)).run()

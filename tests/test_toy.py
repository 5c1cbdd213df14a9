"""The toy world: rendering, tokenizer, tasks, the generator behind the ImageGenerator interface, pre-training cache."""
import numpy as np
import pytest
import torch

from gift_fast import toy
from gift_fast.toy.pretrain import _match_matrix


def test_render_is_deterministic_and_covers_the_world():
    for obj in toy.OBJECTS:
        for tex in toy.TEXTURES:
            a = toy.render(toy.Scene("red", obj, tex), np.random.default_rng(3))
            b = toy.render(toy.Scene("red", obj, tex), np.random.default_rng(3))
            assert a.shape == (32, 32, 3) and a.dtype == np.uint8
            assert np.array_equal(a, b)
    # the object's colour is there: the reddest pixels of a red circle are red
    img = toy.render(toy.Scene("red", "circle", "plain"), np.random.default_rng(0)).astype(int)
    assert ((img[..., 0] - img[..., 2]) > 100).sum() > 50
    with pytest.raises(ValueError, match="unknown colour"):
        toy.render(toy.Scene("mauve", "circle", "plain"), np.random.default_rng(0))


def test_digit_writers_are_split_between_pretraining_and_tasks():
    pre, task = toy.digit_glyph_indices("pretrain"), toy.digit_glyph_indices("task")
    for k in range(10):
        assert len(pre[k]) > 50 and len(task[k]) > 50
        assert not set(pre[k]) & set(task[k])


def test_captions_and_prompt_parsing():
    s = toy.Scene("blue", "three", "dots")
    assert s.describe(("colour", "obj")) == "blue three"
    assert s.describe(("obj",)) == "three"
    assert s.describe(("colour",)) == "blue"
    assert toy.parse_prompt("a photo of a blue three on dots.") == {"colour": "blue", "obj": "three", "texture": "dots"}
    assert toy.parse_prompt("a photo of a circle.") == {"colour": None, "obj": "circle", "texture": None}
    # two objects named: ambiguous, drawn at random
    assert toy.parse_prompt("a circle or a square")["obj"] is None


def test_match_matrix_marks_every_image_that_fits_a_caption():
    scenes = [toy.Scene("red", "circle", "dots"), toy.Scene("red", "square", "plain"), toy.Scene("blue", "circle", "dots")]
    parts = [("colour",), ("obj",), ("colour", "obj")]
    M = _match_matrix(parts, scenes)
    assert M.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_tokenizer_knows_the_vocabulary():
    tok = toy.ToyTokenizer()
    for w in list(toy.COLOURS) + list(toy.OBJECTS) + list(toy.TEXTURES):
        assert w in tok.index
    ids = tok(["a photo of a red circle."])[0].tolist()
    assert ids[0] == tok.sot_token_id and tok.eot_token_id in ids and tok.index["<unk>"] not in ids


def test_toy_task_is_deterministic_and_labelled():
    a = toy.toy_task("ToyShapes", train_size=20, test_size=10, seed=0)
    b = toy.toy_task("ToyShapes", train_size=20, test_size=10, seed=0)
    assert a.classnames == list(toy.SHAPES)
    x, y = a.train.tensors
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0
    assert int(y.min()) >= 0 and int(y.max()) < len(a.classnames)
    assert torch.equal(x, b.train.tensors[0]) and torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert a.prompts()[0] == "a photo of a circle."
    with pytest.raises(ValueError, match="unknown toy task"):
        toy.toy_task("ToyPlanets")


def test_generator_is_an_image_generator_and_each_image_depends_only_on_its_prompt_and_seed():
    from gift_fast.synth.generators import ImageGenerator

    gen = toy.ToyGenerator()
    assert isinstance(gen, ImageGenerator)
    prompts = ["a photo of a red circle.", "a photo of a seven.", "a photo of a blue thing on stripes."]
    one = gen.generate(prompts, [1, 2, 3])
    alone = gen.generate(prompts[1:2], [2])[0]
    assert np.array_equal(np.asarray(one[1]), np.asarray(alone))
    assert not np.array_equal(np.asarray(gen.generate(prompts[:1], [9])[0]), np.asarray(one[0]))
    assert one[0].size == (32, 32) and one[0].mode == "RGB"
    red = np.asarray(one[0]).astype(int)
    assert ((red[..., 0] - red[..., 2]) > 100).sum() > 50      # the named colour is rendered
    assert gen.describe()["config"]["generator"] == "toy"
    with pytest.raises(ValueError, match="one seed per prompt"):
        gen.generate(prompts, [1])


def test_generator_goes_through_the_synthesis_engine(tmp_path):
    from gift_fast.data.synthetic import load_synthetic_set
    from gift_fast.synth.engine import synthesize_task
    from gift_fast.synth.prompts import build_class_pool, sample_prompts

    pool = build_class_pool(toy.BASE_CLASSNAMES, [list(toy.DIGITS)])
    prompts = sample_prompts(pool, 12, seed=0, task_index=1)
    synthesize_task(toy.ToyGenerator(), "ToyShapes", prompts, tmp_path, seed=0, task_index=1, batch_size=5,
                    progress=False, image_format="png")
    ds = load_synthetic_set(tmp_path, "ToyShapes", image_size=32, progress=False)
    assert len(ds) == 12 and ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (3, 32, 32)
    assert ds.texts() == prompts


def test_pretraining_is_cached_by_config(tmp_path, monkeypatch):
    monkeypatch.setenv("GIFT_FAST_CACHE", str(tmp_path))
    cfg = toy.ToyPretrainConfig(model_name="toy-vit-test", images=48, steps=2, batch_size=16, warmup=1)
    p1 = toy.pretrained_toy_clip_path("toy-vit-test", cfg, progress=False)
    assert p1.is_file() and p1.parent == tmp_path / "toy"
    mtime = p1.stat().st_mtime_ns
    assert toy.pretrained_toy_clip_path("toy-vit-test", cfg, progress=False) == p1
    assert p1.stat().st_mtime_ns == mtime                     # reused, not trained again
    p2 = toy.pretrained_toy_clip_path("toy-vit-test", toy.ToyPretrainConfig(model_name="toy-vit-test", images=48,
                                                                            steps=3, batch_size=16, warmup=1),
                                      progress=False)
    assert p2 != p1
    from gift_fast.checkpoints import checkpoint_metadata, read_state_dict
    from gift_fast.models import create_clip

    assert checkpoint_metadata(p1)["toy_pretrain"]["steps"] == 2
    m = create_clip("toy-vit-test", None).model
    m.load_state_dict(read_state_dict(p1))
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == sorted([p1.name, p2.name])


def test_the_pretrained_toy_clip_keeps_its_cache_key():
    # The key names the cached file: a new key pre-trains the tiny CLIP again (and may change the tiny
    # preset's table); it must change only with the world, the pre-training config, the architecture or the vocabulary.
    assert toy.pretrain_key(toy.ToyPretrainConfig()) == "ac436d2d063f45f8"
    assert toy.pretrain_key(toy.ToyPretrainConfig(model_name="toy-vit-test")) == "880f47ece2d40cce"


def test_pretraining_keeps_its_learning_rates():
    # The pre-training's own rule (warm-up times a cosine over all steps), bit for bit: the cached weights
    # were trained with it and the cache key does not record it.
    import math

    from gift_fast.schedule import warmup_times_cosine_lr

    cfg = toy.ToyPretrainConfig()
    lr = warmup_times_cosine_lr(cfg.lr, cfg.warmup, cfg.steps)
    for step in range(cfg.steps):
        warm = min(1.0, (step + 1) / cfg.warmup)
        assert lr(step) == cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))

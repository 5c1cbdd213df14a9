"""Model loading: the tiny path for real, the open_clip path's errors (no downloads here)."""
import os

import pytest
import torch

from gift_fast.models import (atomic_save_safetensors, check_state_dict, checkpoint_metadata, create_clip,
                              load_weights, read_state_dict, save_model)


def test_tiny_model_builds_with_frozen_logit_scale_and_toy_tokenizer():
    b = create_clip("toy-vit-test", None)
    assert not b.model.logit_scale.requires_grad
    assert all(p.requires_grad for n, p in b.model.named_parameters() if n != "logit_scale")
    tok = b.tokenize(["a photo of a red circle.", "a photo of a zebra."])
    assert tok.shape == (2, 16) and tok.dtype == torch.long
    # <eot> is the largest id, so open_clip's argmax pooling reads the end of the caption
    assert int(tok[0].max()) == b.tokenizer.eot_token_id == b.tokenizer.vocab_size - 1
    img = torch.randn(3, 3, b.image_size, b.image_size)
    assert b.model.encode_image(img).shape == (3, 32)
    assert b.model.encode_text(tok).shape == (2, 32)


def test_unknown_words_are_unk_and_long_texts_keep_their_end_token():
    b = create_clip("toy-vit-test", None)
    unk = b.tokenizer.index["<unk>"]
    t = b.tokenize(["zebra", " ".join(["red"] * 40)])
    assert t[0, 1] == unk
    assert int(t[1, -1]) == b.tokenizer.eot_token_id


def test_save_load_roundtrip_is_atomic_and_keeps_metadata(tmp_path):
    torch.manual_seed(0)
    a = create_clip("toy-vit-test", None).model
    torch.manual_seed(1)
    b = create_clip("toy-vit-test", None).model
    path = save_model(a, tmp_path / "ckpt" / "m.safetensors", metadata={"task": "ToyDigits", "task_index": 0})
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["m.safetensors"]        # no temporary file left
    load_weights(b, path)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    assert checkpoint_metadata(path) == {"task": "ToyDigits", "task_index": 0}
    c = create_clip("toy-vit-test", str(path)).model       # a local checkpoint as --pretrained
    assert torch.equal(c.visual.conv1.weight, a.visual.conv1.weight)


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    small = create_clip("toy-vit-test", None).model
    path = save_model(small, tmp_path / "small.safetensors")
    big = create_clip("toy-vit", None).model
    with pytest.raises(ValueError, match="does not fit this model's architecture.*--model"):
        load_weights(big, path)
    with pytest.raises(ValueError, match="shape mismatch"):
        check_state_dict(big, read_state_dict(path))
    with pytest.raises(ValueError, match="does not fit"):
        create_clip("toy-vit", str(path))


def test_open_clip_path_loads_a_local_safetensors_and_rejects_a_wrong_one(tmp_path):
    torch.manual_seed(0)
    ref = create_clip("ViT-S-32-alt", None)          # real open_clip architecture, random weights
    path = atomic_save_safetensors(ref.model.state_dict(), tmp_path / "s32.safetensors")
    got = create_clip("ViT-S-32-alt", str(path))
    assert torch.equal(got.model.visual.conv1.weight, ref.model.visual.conv1.weight)
    assert got.image_size == 224 and got.tokenize(["a cat"]).shape == (1, 77)
    tiny = save_model(create_clip("toy-vit-test", None).model, tmp_path / "tiny.safetensors")
    with pytest.raises(ValueError, match="does not fit this model's architecture"):
        create_clip("ViT-S-32-alt", str(tiny))


def test_missing_checkpoint_and_unknown_model_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_clip("ViT-B-16", str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_clip("toy-vit-test", str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="unknown model 'ViT-X-99'"):
        create_clip("ViT-X-99", None)

"""Model loading: the tiny path for real, the open_clip path's errors (no downloads here)."""
import os

import pytest
import torch

from gift_fast.checkpoints import (architecture_options, atomic_save_safetensors, check_state_dict,
                                   checkpoint_metadata, load_weights, read_state_dict, save_model)
from gift_fast.models import create_clip
from gift_fast.toy.clip import build_tiny_clip


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
    assert checkpoint_metadata(path) == {"task": "ToyDigits", "task_index": 0, "architecture": {"quick_gelu": False}}
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


# ----------------------------------------------------------------------------- activation (QuickGELU)
def _outputs(model, image_size, tokens):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, image_size, image_size, generator=g)
    model.eval()
    with torch.no_grad():
        return torch.cat([model.encode_image(x), model.encode_text(tokens)])


def test_quick_gelu_checkpoint_reloads_to_the_same_function(tmp_path):
    torch.manual_seed(0)
    src = build_tiny_clip("toy-vit-test", quick_gelu=True)
    assert architecture_options(src) == {"quick_gelu": True}
    path = save_model(src, tmp_path / "qg.safetensors")
    assert checkpoint_metadata(path)["architecture"] == {"quick_gelu": True}
    tokens = create_clip("toy-vit-test", None).tokenize(["a photo of a red circle.", "a zebra"])
    want = _outputs(src, 32, tokens)
    got = create_clip("toy-vit-test", str(path))
    assert got.info["activation"] == "quick_gelu"
    assert torch.equal(_outputs(got.model, 32, tokens), want)
    # the same weights under nn.GELU are another function: the record is what keeps it
    gelu = create_clip("toy-vit-test", str(path), quick_gelu=False)
    assert gelu.info["activation"] == "gelu"
    assert not torch.allclose(_outputs(gelu.model, 32, tokens), want, atol=1e-4)


def test_open_clip_checkpoint_keeps_quick_gelu_and_a_plain_file_needs_the_quickgelu_name(tmp_path):
    torch.manual_seed(0)
    src = create_clip("ViT-S-32-alt", None, quick_gelu=True)
    assert src.info["activation"] == "quick_gelu"
    tokens = src.tokenize(["a photo of a cat.", "a car"])
    want = _outputs(src.model, 224, tokens)
    # a run's checkpoint (save_model records the activation)
    ckpt = save_model(src.model, tmp_path / "task_01.safetensors")
    got = create_clip("ViT-S-32-alt", str(ckpt))
    assert got.info["activation"] == "quick_gelu"
    assert torch.equal(_outputs(got.model, 224, tokens), want)
    # a plain state dict with no record (as OpenAI's weights saved to a file): GELU, with a warning
    # that names the fix; quick_gelu=True gives the QuickGELU function back
    plain = tmp_path / "weights.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in src.model.state_dict().items()}}, plain)
    with pytest.warns(UserWarning, match="does not record its activation.*quick_gelu=True"):
        g = create_clip("ViT-S-32-alt", str(plain))
    assert g.info["activation"] == "gelu"
    q = create_clip("ViT-S-32-alt", str(plain), quick_gelu=True)
    assert q.info["activation"] == "quick_gelu"
    assert torch.equal(_outputs(q.model, 224, tokens), want)


def test_quickgelu_architecture_name_loads_a_plain_file_with_quick_gelu(tmp_path):
    """The documented way for a local file of OpenAI weights: the -quickgelu architecture name."""
    import warnings

    torch.manual_seed(0)
    src = create_clip("ViT-B-32-quickgelu", None)
    assert src.info["activation"] == "quick_gelu"
    plain = tmp_path / "ViT-B-32.pt"
    torch.save(src.model.state_dict(), plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no "does not record its activation" warning here
        got = create_clip("ViT-B-32-quickgelu", str(plain))
    assert got.info["activation"] == "quick_gelu"
    assert torch.equal(got.model.visual.conv1.weight, src.model.visual.conv1.weight)
    with pytest.raises(ValueError, match="contradicts the model name"):
        create_clip("ViT-B-32-quickgelu", None, quick_gelu=False)


def test_read_state_dict_is_open_clips_reader(tmp_path):
    """read_state_dict goes through open_clip.factory.load_state_dict; it still does what the project's own
    reader did: safetensors and torch files, {"state_dict": ...} unwrapped, "module." stripped, clear errors."""
    from open_clip.factory import load_state_dict

    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_tiny_clip("toy-vit-test").state_dict().items()}
    files = {"plain.pt": state, "wrapped.pt": {"state_dict": state},
             "dp.pt": {"state_dict": {"module." + k: v for k, v in state.items()}}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    atomic_save_safetensors(state, tmp_path / "s.safetensors")
    for name in [*files, "s.safetensors"]:
        got, theirs = read_state_dict(tmp_path / name), load_state_dict(str(tmp_path / name))
        assert sorted(got) == sorted(state) == sorted(theirs), name
        assert all(torch.equal(got[k], state[k]) for k in state), name
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "tensor.pt")
    torch.save({}, tmp_path / "empty.pt")
    assert read_state_dict(tmp_path / "empty.pt") == {}


def test_eval_command_reloads_a_quick_gelu_checkpoint_as_the_same_function(tmp_path):
    """`gift-fast eval --pretrained CKPT` scores a QuickGELU checkpoint as the model that wrote it."""
    import json

    from click.testing import CliRunner

    from gift_fast.cli.main import main
    from gift_fast.evaluate import evaluate_tasks
    from gift_fast.builders import build_task_list
    from gift_fast.train import preset_config

    torch.manual_seed(3)
    src = build_tiny_clip("toy-vit-test", quick_gelu=True)
    ckpt = save_model(src, tmp_path / "qg.safetensors")
    cfg = preset_config("tiny", model="toy-vit-test", pretrained=str(ckpt), tasks=["ToyShapes"])
    bundle = create_clip("toy-vit-test", None)
    bundle.model = src
    want = evaluate_tasks(src, bundle.tokenizer, build_task_list(cfg, bundle), device=torch.device("cpu"),
                          progress=False)
    out = tmp_path / "acc.json"
    res = CliRunner().invoke(main, ["eval", "--preset", "tiny", "--model", "toy-vit-test", "--pretrained", str(ckpt),
                                    "--tasks", "ToyShapes", "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    assert got["activation"] == "quick_gelu"
    assert got["accuracy"]["ToyShapes"] == want[0]

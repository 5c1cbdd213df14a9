"""gift_fast.text: prompts cut after their last pooled token give the embeddings and gradients
of the full 77-position (here: context-length) text tower, in float64."""
import pytest
import torch

from gift_fast.text import can_trim, encode_text, trim_tokens


def tiny_clip(**text_kw):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    m = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
             text_cfg=CLIPTextCfg(context_length=20, vocab_size=64, width=32, heads=2, layers=2, **text_kw))
    return m.double()


def prompts(ends, ctx=20, vocab=64, seed=0):
    """Token rows: random ids before an end token (the highest id) at position ``ends[i]``, zero padding after."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(1, vocab - 1, (len(ends), ctx), generator=g)
    for i, e in enumerate(ends):
        t[i, e] = vocab - 1
        t[i, e + 1:] = 0
    return t


@pytest.mark.parametrize("ends", [[3, 7, 5], [0, 0], [19, 2], [6], [4, 4, 4, 11]])
def test_trimmed_prompts_give_the_same_embeddings_and_gradients(ends):
    model = tiny_clip()
    tokens = prompts(ends)
    short = trim_tokens(model, tokens)
    assert short.shape == (len(ends), max(ends) + 1)
    full_emb = model.encode_text(tokens)
    short_emb = encode_text(model, short)
    torch.testing.assert_close(short_emb, full_emb, rtol=1e-12, atol=1e-13)
    w = torch.randn_like(full_emb)
    g_full = torch.autograd.grad((full_emb * w).sum(), list(model.parameters()), allow_unused=True)
    g_short = torch.autograd.grad((encode_text(model, short) * w).sum(), list(model.parameters()), allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g_full, g_short):
        if a is None:
            assert b is None or torch.count_nonzero(b) == 0, name
            continue
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)


def _every_position(model, tokens):
    """The full-context text tower's output at every position [B, L, D] (open_clip's encode_text
    without the pooling): with the causal mask, position p sees positions <= p only."""
    x = model.token_embedding(tokens) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    return x @ model.text_projection


def test_the_cut_is_one_past_the_last_end_token_and_one_less_pools_another_position():
    model = tiny_clip()
    tokens = prompts([3, 7, 5])
    short = trim_tokens(model, tokens)
    assert torch.equal(short, tokens[:, :8])                       # last end token at 7: 8 columns
    every = _every_position(model, tokens)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), every[torch.arange(3), torch.tensor([3, 7, 5])],
                                   rtol=1e-12, atol=1e-13)
        # one column less: row 1 loses its end token and argmax pools its highest remaining id instead
        cut = tokens[:, :7]
        pooled = cut.argmax(dim=-1)
        assert pooled.tolist()[0::2] == [3, 5] and int(pooled[1]) != 7
        got = encode_text(model, cut)
        torch.testing.assert_close(got, every[torch.arange(3), pooled], rtol=1e-12, atol=1e-13)
        assert float((got[1] - every[1, 7]).abs().max()) > 1e-3 * float(every[1, 7].abs().max())


def test_eos_pooling():
    model = tiny_clip(pool_type="eos", eos_id=63)
    tokens = prompts([2, 9])
    tokens[0, 1] = 62                   # not the highest id at the end any more: eos finds 63 anyway
    short = trim_tokens(model, tokens)
    assert short.shape[1] == 10
    torch.testing.assert_close(encode_text(model, short), model.encode_text(tokens), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kw", [dict(no_causal_mask=True), dict(pool_type="last"), dict(pool_type="first")])
def test_towers_where_a_cut_could_change_the_result_are_left_alone(kw):
    model = tiny_clip(**kw)
    tokens = prompts([3, 5])
    assert not can_trim(model)
    assert trim_tokens(model, tokens) is tokens
    torch.testing.assert_close(encode_text(model, tokens), model.encode_text(tokens))


def test_toy_clip_real_prompts():
    from gift_fast.models import create_clip

    bundle = create_clip("toy-vit", None)
    model = bundle.model.double()
    tokens = bundle.tokenizer(["a photo of a red circle.", "a dog", "a blurry photo of a green star on grey."])
    short = trim_tokens(model, tokens)
    assert short.shape[1] < tokens.shape[1]
    torch.testing.assert_close(encode_text(model, short), model.encode_text(tokens), rtol=1e-12, atol=1e-13)


def test_evaluation_classifier_unchanged_by_the_cut():
    """zero_shot_classifier cuts its prompts: the classifier is the full-context one."""
    import torch.nn.functional as F

    from gift_fast.evaluate import zero_shot_classifier
    from gift_fast.models import create_clip

    bundle = create_clip("toy-vit", None)
    model = bundle.model.double()
    names, templates = ["red circle", "dog"], ["a photo of a {}.", "a {}"]
    W = zero_shot_classifier(model, bundle.tokenizer, names, templates, device=torch.device("cpu"))
    with torch.no_grad():
        full = F.normalize(model.encode_text(bundle.tokenizer([t.format(c) for c in names for t in templates])), dim=-1)
    ref = F.normalize(full.view(2, 2, -1).mean(1), dim=-1)
    torch.testing.assert_close(W.double(), ref, rtol=1e-6, atol=1e-7)

"""The text tower on short prompts: the same embeddings from fewer token positions.

CLIP's tokenizer pads every prompt to 77 tokens, and ``encode_text`` runs all 77
through the text transformer, then keeps one position per prompt: the end-of-text
token (``argmax`` pooling: it has the highest id; ``eos``: the tokenizer's id).
The attention is causal, so the kept position never sees a later one: the columns
after the last kept position of a batch change nothing. GIFT's prompts ("a photo
of a {class}, a type of aircraft.") end near token 15, so a step encodes ~5x fewer
text positions (100 class prompts for L_ce and 64 synthetic prompts every step).

``trim_tokens(model, tokens)`` drops those columns on the host (no device sync: the
tokens are on the CPU when they are made, once per task); ``encode_text(model,
tokens)`` is ``model.encode_text`` for any token length up to the context (open_clip's
``CLIP.encode_text`` adds all 77 positional embeddings, so it needs the full length).
For models where trimming could change the result (no causal mask, pooling at the
first or last position, another text tower) ``trim_tokens`` returns the tokens as they
are and ``encode_text`` is ``model.encode_text``.
"""
from __future__ import annotations

import torch


def can_trim(model) -> bool:
    """True for an open_clip ``CLIP`` text tower that is causal and pools at the EOT token."""
    return (getattr(model, "attn_mask", None) is not None and hasattr(model, "positional_embedding")
            and hasattr(model, "token_embedding") and hasattr(model, "ln_final")
            and getattr(model, "text_pool_type", None) in ("argmax", "eos")
            and (model.text_pool_type == "argmax" or getattr(model, "text_eos_id", None) is not None))


def pooled_positions(model, tokens: torch.Tensor) -> torch.Tensor:
    """The position each prompt's embedding is read from (as open_clip's ``text_global_pool``)."""
    if model.text_pool_type == "argmax":
        return tokens.argmax(dim=-1)
    return (tokens == model.text_eos_id).int().argmax(dim=-1)


def trim_tokens(model, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens[:, :L]`` with L = 1 + the last pooled position of the batch (call it on CPU tokens)."""
    if tokens.dim() != 2 or tokens.shape[0] == 0 or not can_trim(model):
        return tokens
    length = int(pooled_positions(model, tokens).max()) + 1
    return tokens[:, :length].contiguous() if length < tokens.shape[1] else tokens


def encode_text(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` that also takes fewer positions than the context (see ``trim_tokens``)."""
    pos = getattr(model, "positional_embedding", None)
    if pos is None or tokens.shape[1] == pos.shape[0] or not can_trim(model):
        return model.encode_text(tokens)
    n = tokens.shape[1]
    if n > pos.shape[0]:
        raise ValueError(f"{n} tokens per prompt, but the text tower's context is {pos.shape[0]}")
    from open_clip.model import text_global_pool

    # open_clip 3.x CLIP.encode_text on the first n positions
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + pos[:n].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


__all__ = ["can_trim", "trim_tokens", "encode_text", "pooled_positions"]

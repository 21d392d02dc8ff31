"""SD3 without T5 at the cost of one zero token instead of 256.

StableDiffusion3Pipeline without T5 appends ``max_sequence_length`` (256) zero vectors to the CLIP tokens in
T5's place. They stay identical through the whole MMDiT: the context stream has no positional embedding, its
norms, modulation and feed-forward act per token, and identical queries attend identically (Esser et al. 2024,
"Scaling Rectified Flow Transformers", fig. 2). In every attention, n identical keys with identical values act
as one key whose logit is raised by log n. So the transformer computes the same function on the CLIP tokens
plus one zero token, with log 256 added to that token's attention logit, as on the 333-token layout the
pipeline feeds; on the tiny shapes model the 256 tokens were most of the compute.

``ZeroT5Attention`` applies the raise only to a context of exactly ``clip_tokens + 1`` tokens, so the plain
pipeline's own 333-token calls through the same transformer stay plain joint attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length: the zeros it feeds without T5


class ZeroT5Attention:
    """Joint attention (image then context tokens, as diffusers' JointAttnProcessor2_0) where the last of a
    ``clip_tokens + 1``-token context stands for ``copies`` identical zero tokens."""

    def __init__(self, clip_tokens: int, copies: int = T5_TOKENS):
        self.context_tokens, self.log_copies = clip_tokens + 1, math.log(copies)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, image_tokens = hidden_states.shape[:2]

        def heads(x, norm):
            x = x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        q = heads(attn.to_q(hidden_states), attn.norm_q)
        k = heads(attn.to_k(hidden_states), attn.norm_k)
        v = heads(attn.to_v(hidden_states), None)
        bias = None
        if encoder_hidden_states is not None:
            c = encoder_hidden_states
            q = torch.cat([q, heads(attn.add_q_proj(c), attn.norm_added_q)], dim=2)
            k = torch.cat([k, heads(attn.add_k_proj(c), attn.norm_added_k)], dim=2)
            v = torch.cat([v, heads(attn.add_v_proj(c), None)], dim=2)
            if c.shape[1] == self.context_tokens:
                bias = torch.zeros(1, k.shape[2], dtype=q.dtype, device=q.device)  # over keys, for every query
                bias[0, -1] = self.log_copies
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(q.dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :image_tokens]))
        if encoder_hidden_states is None:
            return image
        context = out[:, image_tokens:]
        return image, (context if attn.context_pre_only else attn.to_add_out(context))


def use_one_zero_token(pipe) -> None:
    """Install ``ZeroT5Attention`` on a T5-less StableDiffusion3Pipeline's transformer; prompts are then encoded
    by ``encode_prompt(..., max_sequence_length=1)``."""
    pipe.transformer.set_attn_processor(ZeroT5Attention(pipe.tokenizer.model_max_length))

"""Packed pair batches for the matching head: every token of every pair once, no padding rows.

A batch of image-text pairs is one (tokens, hidden) matrix, pair after pair, the pairs of one image next to each
other. Every linear layer (nearly all the work) then runs on real tokens only, whatever the mix of caption lengths.
Only attention needs the structure back:
- self-attention: the tokens go to a (pairs, longest) padded layout and back, so each caption attends to its own
  tokens with its padding keys masked, as in the padded path;
- cross-attention: the tokens of one image's pairs attend to that image's keys/values, one call per image, the
  keys/values as they are (a view, no copy) and the tokens as one sequence of queries: a query's attention does
  not depend on the other queries, so this is exact.
The results equal the padded path's (`TextEncoder.forward`) up to summation order.

Written by hand: PyTorch's variable-length attention (`torch.nn.attention.varlen`) runs CUDA's flash kernels in
half precision only, and nothing packs an encoder with cross-attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from models.med import TEXT_ATTENTION_BACKENDS, BertLayer, ImageKV, TextEncoder, padding_bias


@dataclass
class PackedPairs:
    """A batch of pairs as packed tokens (B pairs, T tokens), with what attention needs to restore the pairs."""
    input_ids: torch.Tensor    # (T,) every pair's tokens, pair after pair
    pair: torch.Tensor         # (T,) each token's pair
    positions: torch.Tensor    # (T,) each token's position in its caption
    padded_rows: torch.Tensor  # (T,) each token's row in the (B * longest) padded layout
    key_mask: torch.Tensor     # (B, longest) 1 for tokens, 0 for padding
    first: torch.Tensor        # (B,) row of each pair's first token
    image_tokens: list[int]    # tokens of each image's pairs (an image's pairs are adjacent), in order
    image_pairs: list[int]     # pairs of each image, in order


def pack_pairs(text_ids: torch.Tensor, texts: torch.Tensor, lengths: torch.Tensor, host_lengths: torch.Tensor,
               pairs_per_image: Sequence[int]) -> PackedPairs:
    """Pack the pairs whose captions are rows `texts` of `text_ids` (N, L), of `lengths` tokens each.

    `host_lengths` are the same lengths on the host (every size is known there: the device is never waited for);
    `pairs_per_image` splits the pairs, in order, by the image they are paired with.
    """
    device = text_ids.device
    pairs, tokens, longest = host_lengths.numel(), int(host_lengths.sum()), int(host_lengths.max())
    starts = torch.cumsum(lengths, 0) - lengths
    pair = torch.repeat_interleave(torch.arange(pairs, device=device), lengths, output_size=tokens)
    positions = torch.arange(tokens, device=device) - starts[pair]
    image_tokens = [int(part.sum()) for part in torch.split(host_lengths, list(pairs_per_image))]
    return PackedPairs(
        input_ids=text_ids[texts[pair], positions], pair=pair, positions=positions,
        padded_rows=pair * longest + positions,
        key_mask=(torch.arange(longest, device=device)[None, :] < lengths[:, None]).long(), first=starts,
        image_tokens=image_tokens, image_pairs=list(pairs_per_image))


def pack_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor, pairs_per_image: Sequence[int]
                ) -> PackedPairs:
    """`pack_pairs` of a padded batch (B, L) (a host sync for the lengths: for tests and tools)."""
    lengths = attention_mask.sum(dim=1)
    return pack_pairs(input_ids, torch.arange(input_ids.shape[0], device=input_ids.device), lengths, lengths.cpu(),
                      pairs_per_image)


class _Padded:
    """Queries, keys and values of a batch in the (B * longest, hidden) padded layout, padding rows 0.

    Without gradients the same buffers serve every layer (the token rows are overwritten, the padding rows stay
    0): no allocation and no zero-filling per layer. With gradients each layer gets its own (autograd keeps them).
    """

    def __init__(self, packed: PackedPairs):
        self.rows = packed.padded_rows
        self.size = packed.key_mask.numel()
        self.buffers: list[Optional[torch.Tensor]] = [None, None, None]

    def put(self, i: int, x: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers[i]
        if buffer is None or buffer.dtype != x.dtype or torch.is_grad_enabled():
            buffer = x.new_zeros(self.size, x.shape[1])
            self.buffers[i] = buffer
        return buffer.index_copy_(0, self.rows, x)


def _self_attention(layer: BertLayer, hidden: torch.Tensor, packed: PackedPairs, padded: _Padded,
                    bias: torch.Tensor, last: bool) -> torch.Tensor:
    """Self-attention block of every token, or (last) of each pair's first token; returns its rows (T or B)."""
    attn = layer.attention.self
    pairs, longest = packed.key_mask.shape
    heads, dim = attn.num_heads, attn.head_dim
    heads_of = lambda x, length: x.view(pairs, length, heads, dim).transpose(1, 2)  # (B, h, L, d)
    query_rows = hidden.index_select(0, packed.first) if last else hidden
    k = heads_of(padded.put(1, attn.key(hidden)), longest)
    v = heads_of(padded.put(2, attn.value(hidden)), longest)
    q = heads_of(attn.query(query_rows), 1) if last else heads_of(padded.put(0, attn.query(hidden)), longest)
    dropout = attn.dropout_p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout).transpose(1, 2)  # (B, L, h, d)
    # Back to the rows of `query_rows`: one gather of the real tokens (the first tokens' rows are already in order).
    out = out.reshape(pairs, -1) if last else out[packed.pair, packed.positions].view(hidden.shape[0], -1)
    return layer.attention.output(out, query_rows)


def _cross_attention(layer: BertLayer, hidden: torch.Tensor, counts: Sequence[int],
                     image_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-attention block: the `counts[g]` consecutive rows of image g attend to its keys/values (G, h, N, d)."""
    cross = layer.crossattention.self
    heads, dim = cross.num_heads, cross.head_dim
    dropout = cross.dropout_p if cross.training else 0.0
    # split / unbind / cat rather than a slice per image: their backward passes allocate each gradient once, a
    # slice's allocates a zero tensor of the whole batch per image (quadratic in the images).
    keys, values = (x.unbind(0) for x in image_kv)
    out = []
    for g, q_g in enumerate(cross.query(hidden).split(list(counts))):
        if q_g.shape[0]:
            q_g = q_g.view(1, -1, heads, dim).transpose(1, 2)  # (1, h, rows, d)
            out_g = F.scaled_dot_product_attention(q_g, keys[g][None], values[g][None], dropout_p=dropout)
            out.append(out_g[0].transpose(0, 1))  # (rows, h, d), copied once by the cat
    return layer.crossattention.output(torch.cat(out).view(hidden.shape[0], -1), hidden)


def first_token_hidden(encoder: TextEncoder, packed: PackedPairs, image_kv: ImageKV) -> torch.Tensor:
    """The multimodal encoder's last hidden state of each pair's first token (B, hidden).

    `image_kv[layer]`: keys/values (G, h, N, d) of the G images of `packed`, in its order.
    """
    embeddings = encoder.embeddings
    x = embeddings.word_embeddings(packed.input_ids) + embeddings.position_embeddings(packed.positions)
    hidden = embeddings.dropout(embeddings.LayerNorm(x))  # (T, hidden)
    bias = padding_bias(packed.key_mask, hidden.dtype)
    padded = _Padded(packed)
    last = len(encoder.layers) - 1
    with sdpa_kernel(TEXT_ATTENTION_BACKENDS):
        for i, layer in enumerate(encoder.layers):
            is_last = i == last
            hidden = _self_attention(layer, hidden, packed, padded, bias, is_last)
            counts = packed.image_pairs if is_last else packed.image_tokens
            hidden = _cross_attention(layer, hidden, counts, image_kv[i])
            hidden = layer.output(layer.intermediate(hidden), hidden)
    return hidden

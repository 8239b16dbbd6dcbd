"""BLIP's text encoder: BERT with a cross-attention block in every layer.

Written by hand because no library ships this layer: transformers' BertModel can add cross-attention,
but its module names, masks and caching change between releases, and we need the image keys/values
as a first-class input (computed once per image, reused for every text it is paired with).
Module names match the official checkpoints (`encoder.layer.N.crossattention.self.key`, ...).
`transformers` is used only for the configuration.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import BertConfig

# Per-layer (key, value) of the image tokens, each (B, heads, N_img, head_dim).
ImageKV = Sequence[tuple[torch.Tensor, torch.Tensor]]

MASK_VALUE = -10000.0  # BERT's additive padding mask; exp(-10000) is 0 in every float type we use

# Attention kernels for the text encoder. Its batches change shape all the time (padding is trimmed to each
# batch's longest caption; evaluation batches differ in length and in texts per image). cuDNN attention, which
# recent PyTorch puts first on Hopper and Blackwell GPUs, builds a plan for every new (batch, length) shape, tens
# of milliseconds of host time each; these kernels need none. The ViT, whose shapes never change, keeps PyTorch's
# choice.
TEXT_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def load_med_config(path: str, encoder_width: Optional[int] = None) -> BertConfig:
    """Read a BLIP `med_config.json`; `encoder_width` follows the vision encoder's width."""
    config = BertConfig.from_json_file(path)
    if encoder_width is not None:
        config.encoder_width = encoder_width
    return config


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 mask -> (B, 1, 1, L) additive bias: 0 for tokens, -10000 for padding."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * MASK_VALUE


class MultiHeadAttention(nn.Module):
    """Queries from the text; keys/values from the text (self) or the image tokens (cross)."""

    def __init__(self, hidden_size: int, kv_width: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f'hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(kv_width, hidden_size)
        self.value = nn.Linear(kv_width, hidden_size)
        self.dropout_p = dropout
        self.fused_attn = True  # F.scaled_dot_product_attention; False = the explicit math, kept for checking

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, L, d)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `x` (B, N, kv_width), each (B, h, N, d)."""
        return self._heads(self.key(x)), self._heads(self.value(x))

    def forward(self, hidden: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend from `hidden` (B, L, hidden) to `kv`, each (G, h, N, d).

        G may divide B: then each key/value entry serves B // G consecutive rows (texts paired with the same
        image), whose queries are stacked into one sequence: attention rows are independent without a mask,
        so the result is the same as repeating the keys/values, without copying them.
        """
        q = self._heads(self.query(hidden))  # (B, h, L, d)
        k, v = kv
        batch, heads, length, dim = q.shape
        groups = k.shape[0]
        shared = groups != batch
        if shared:
            if bias is not None or batch % groups:
                raise ValueError(f'{groups} key/value entries cannot serve {batch} query rows')
            q = q.view(groups, batch // groups, heads, length, dim).transpose(1, 2).reshape(groups, heads, -1, dim)
        dropout = self.dropout_p if self.training else 0.0
        if bias is not None:
            bias = bias.to(q.dtype)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, h, L, N)
            if bias is not None:
                scores = scores + bias
            probs = F.dropout(scores.softmax(dim=-1), p=dropout, training=self.training)
            out = probs @ v
        if shared:
            out = out.view(groups, heads, batch // groups, length, dim).transpose(1, 2)
        return out.reshape(batch, heads, length, dim).transpose(1, 2).reshape(batch, length, -1)  # (B, L, hidden)


class ResidualOutput(nn.Module):
    """Projection, dropout, residual and post-LayerNorm: closes both the attention and the feed-forward blocks."""

    def __init__(self, config: BertConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.dense(x))
        # Without gradients, added in place when that keeps the sum's dtype (under bf16 autocast x is bf16 and the
        # residual fp32): the same sum, without allocating (and first touching) another tensor.
        if torch.is_grad_enabled() or x.dtype != residual.dtype:
            return self.LayerNorm(x + residual)
        return self.LayerNorm(x.add_(residual))


class AttentionBlock(nn.Module):
    def __init__(self, config: BertConfig, kv_width: int):
        super().__init__()
        # `self.self` is the name in the official checkpoints (`attention.self.query.weight`).
        self.self = MultiHeadAttention(config.hidden_size, kv_width, config.num_attention_heads,
                                       config.attention_probs_dropout_prob)
        self.output = ResidualOutput(config, config.hidden_size)


class Intermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        if config.hidden_act != 'gelu':
            raise ValueError(f"med_config hidden_act must be 'gelu' (exact erf GELU); got {config.hidden_act!r}")
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without gradients in place: the same erf GELU kernel, without another (tokens x 3072) tensor, which cost
        # about a fifth of the projection's time on the 2-core Xeon (first touch of freshly mapped memory).
        return F.gelu(self.dense(x)) if torch.is_grad_enabled() else torch.ops.aten.gelu_(self.dense(x))


class BertLayer(nn.Module):
    """Self-attention, then (multimodal only) cross-attention to the image, then the feed-forward block."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = AttentionBlock(config, config.hidden_size)
        self.crossattention = AttentionBlock(config, config.encoder_width)
        self.intermediate = Intermediate(config)
        self.output = ResidualOutput(config, config.intermediate_size)

    def forward(self, hidden: torch.Tensor, text_bias: torch.Tensor,
                image_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None, cls_only: bool = False
                ) -> torch.Tensor:
        """`cls_only`: every token's keys/values, but only the first token's output (B, 1, hidden)."""
        attn = self.attention
        query = hidden[:, :1] if cls_only else hidden
        hidden = attn.output(attn.self(query, attn.self.project_kv(hidden), text_bias), query)
        if image_kv is not None:
            cross = self.crossattention
            hidden = cross.output(cross.self(hidden, image_kv), hidden)  # image tokens are never masked
        return self.output(self.intermediate(hidden), hidden)


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings (BLIP has no token-type embeddings)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Saved in the official checkpoints, so it stays a persistent buffer.
        self.register_buffer('position_ids', torch.arange(config.max_position_embeddings).unsqueeze(0))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, :input_ids.shape[1]]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class TextEncoder(nn.Module):
    """BLIP's BERT: text-only mode (no image) for contrastive features, multimodal mode for matching.

    Multimodal mode takes either the image tokens (`image_embeds`) or their per-layer keys/values
    (`image_kv`, from `image_kv()`), so an image's keys/values can be computed once and reused.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # BERT's initialisation; only matters when training from scratch (official weights overwrite it).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.layer

    def set_fused_attn(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                module.fused_attn = enabled

    def image_kv(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of the image tokens for every layer."""
        return [layer.crossattention.self.project_kv(image_embeds) for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_embeds: Optional[torch.Tensor] = None, image_kv: Optional[ImageKV] = None,
                cls_only: bool = False) -> torch.Tensor:
        """Returns the last hidden state (B, L, hidden); with `cls_only`, only its first token's (B, 1, hidden).

        Features and matching logits read only the first token, and in the last layer no other token's output
        feeds it: `cls_only` skips their queries, attention and feed-forward there (the last layer's share of the
        work, less the keys/values that the first token still attends to).
        """
        if image_embeds is not None and image_kv is not None:
            raise ValueError('pass image_embeds or image_kv, not both')
        hidden = self.embeddings(input_ids)
        bias = padding_bias(attention_mask, hidden.dtype)
        last = len(self.layers) - 1
        with sdpa_kernel(TEXT_ATTENTION_BACKENDS):
            for i, layer in enumerate(self.layers):
                if image_kv is not None:
                    kv = image_kv[i]
                elif image_embeds is not None:
                    kv = layer.crossattention.self.project_kv(image_embeds)
                else:
                    kv = None
                hidden = layer(hidden, bias, kv, cls_only=cls_only and i == last)
        return hidden

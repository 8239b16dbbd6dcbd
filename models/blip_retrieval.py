"""BLIP image-text retrieval model: the original constructor, call and state-dict layout.

`model(image, caption, alpha, idx) -> (loss_ita, loss_itm)` is kept as a thin composition of the public
pieces that evaluation uses too: `tokenize`, `encode_image`, `encode_text`, `match_logits`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig

import utils
from models.checkpoint import MOMENTUM_PAIRS, load_pretrained
from models.hf import is_hf_source, load_hf_pretrained
from models.losses import distilled_targets, hard_negative_weights, itc_loss, itm_loss, same_id_targets
from models.med import TextEncoder, load_med_config
from models.packed import PackedPairs, first_token_hidden, pack_pairs
from models.tokenizer import (DEFAULT_TOKENIZER, check_vocab_size, init_tokenizer, tokenize, trim_padding,
                              with_enc_token)
from models.vit import VitSpec, create_vit

_logger = logging.getLogger(__name__)

# All ranks' copies of a per-rank training tensor: every rank trains on a batch of one shape, so the size
# exchange (and its wait for the device) of the general gather is skipped.
gather_batch = partial(utils.all_gather_cat, equal_sizes=True)


@dataclass
class TrainOutputs:
    loss_ita: torch.Tensor
    loss_itm: torch.Tensor
    itm_logits: torch.Tensor       # (3B, 2): positives, text+negative image, image+negative text
    neg_image_idx: torch.Tensor    # (B,) negative image (index into the candidates) for each text
    neg_text_idx: torch.Tensor     # (B,) negative text for each image
    no_negative: torch.Tensor      # (2B,) bool: that negative pair had no candidate and is left out of loss_itm


@dataclass
class NegativeCandidates:
    """What a batch's hard negatives are drawn from: the batch itself, or the batches of every rank of the step."""
    idx: torch.Tensor               # (K,) image ids
    image_feat: torch.Tensor        # (K, embed_dim), for the sampling weights only
    text_feat: torch.Tensor         # (K, embed_dim)
    image_embeds: torch.Tensor      # (K, 1+P, D): a negative's gradient flows back to the batch that owns it
    input_ids: torch.Tensor         # (K, L), starting with [ENC]
    attention_mask: torch.Tensor    # (K, L)


class Ranks:
    """How one rank's batch meets the other batches of a training step; this default: every rank is a process.

    A step shares two things across ranks: the momentum features that fill the queue, and (with
    `negative_all_rank`) the candidates of the hard negatives. Here both go through all-gathers (utils), and
    every forward updates the momentum encoders, as in the original. models/virtual_ranks.py plays several ranks
    in one process by overriding these four methods.
    """

    no_negative: Optional[torch.Tensor] = None  # (2B,) once forward_train ran: negative pairs without a candidate

    def momentum_features(self, model: 'BLIP_Retrieval', image: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model.momentum_update()
        return model.momentum_features(image, input_ids, attention_mask)

    def share_momentum_features(self, model: 'BLIP_Retrieval', image_feat_m: torch.Tensor, text_feat_m: torch.Tensor,
                                idx: torch.Tensor) -> None:
        model.enqueue(gather_batch(image_feat_m), gather_batch(text_feat_m), gather_batch(idx))

    def negative_candidates(self, model: 'BLIP_Retrieval', idx: torch.Tensor, image_feat: torch.Tensor,
                            text_feat: torch.Tensor, image_embeds: torch.Tensor, itm_ids: torch.Tensor,
                            attention_mask: torch.Tensor) -> NegativeCandidates:
        if not (model.negative_all_rank and utils.get_world_size() > 1):
            return NegativeCandidates(idx, image_feat, text_feat, image_embeds, itm_ids, attention_mask)
        # Negatives may live on other ranks: gathered, their gradients flow back to their owner.
        return NegativeCandidates(gather_batch(idx), gather_batch(image_feat), gather_batch(text_feat),
                                  utils.all_gather_with_grad(image_embeds), gather_batch(itm_ids),
                                  gather_batch(attention_mask))

    def hard_negatives(self, model: 'BLIP_Retrieval', idx: torch.Tensor, image_feat: torch.Tensor,
                       text_feat: torch.Tensor, candidates: NegativeCandidates
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        negatives = model.hard_negatives(idx, image_feat, text_feat, candidates)
        self.no_negative = negatives[2]
        return negatives


class BLIP_Retrieval(nn.Module):
    """BLIP ViT + BERT retrieval model with momentum encoders and feature queues.

    Args:
        med_config: path of the BERT config (`configs/med_config.json`), a dict or a BertConfig.
        image_size: input resolution.
        vit: 'base', 'large' or a mapping {embed_dim, depth, num_heads, patch_size, mlp_ratio}.
        vit_grad_ckpt, vit_ckpt_layer: activation checkpointing of the last `vit_ckpt_layer` ViT blocks.
        embed_dim: size of the contrastive projections.
        queue_size: number of momentum features kept for the contrastive loss.
        momentum: EMA factor of the momentum encoders.
        negative_all_rank: sample hard negatives from the batches of all ranks (with gradients).
        tokenizer: 'bert-base-uncased' (bundled), a vocab.txt, a folder or another hub id (models/tokenizer.py).
    """

    def __init__(self, med_config: Union[str, Mapping, BertConfig] = 'configs/med_config.json',
                 image_size: int = 384, vit: VitSpec = 'base', vit_grad_ckpt: bool = False,
                 vit_ckpt_layer: int = 0, embed_dim: int = 256, queue_size: int = 57600,
                 momentum: float = 0.995, negative_all_rank: bool = False,
                 tokenizer: str = DEFAULT_TOKENIZER):
        super().__init__()
        self.tokenizer = init_tokenizer(tokenizer)
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer)
        text_config = _bert_config(med_config, vision_width)
        check_vocab_size(self.tokenizer, text_config.vocab_size, tokenizer)
        self.text_encoder = TextEncoder(text_config)
        text_width = text_config.hidden_size

        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)

        self.visual_encoder_m, _ = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = TextEncoder(text_config)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        self._copy_to_momentum()

        self.register_buffer('image_queue', F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer('text_queue', F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer('idx_queue', torch.full((1, queue_size), -100))
        self.register_buffer('ptr_queue', torch.zeros(1, dtype=torch.long))
        self.temp = nn.Parameter(0.07 * torch.ones([]))

        self.image_size = image_size
        self.queue_size = queue_size
        self.momentum = momentum
        self.negative_all_rank = negative_all_rank
        # Fast path: padding columns dropped, and the image keys/values of a step computed once for the
        # three matching passes. False = the straightforward path, kept as the reference in tests.
        self.fast_path = True

    # ------------------------------------------------------------------ public encoders
    @property
    def enc_token_id(self) -> int:
        return self.tokenizer.enc_token_id

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (input_ids, attention_mask) on the model's device, padded to 35 tokens."""
        return tokenize(self.tokenizer, captions, self.temp.device)

    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> image tokens (B, 1+P, D) and normalized contrastive features (B, embed_dim)."""
        image_embeds = self.visual_encoder(image)
        image_feat = F.normalize(fp32_head(self.vision_proj, image_embeds[:, 0, :]), dim=-1)
        return image_embeds, image_feat

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cls_only: bool = True
                    ) -> torch.Tensor:
        """Normalized contrastive text features (B, embed_dim), text encoder without the image.

        `cls_only=False` runs the last layer over every token, as the original did (same values up to rounding).
        """
        hidden = self.text_encoder(input_ids, attention_mask, cls_only=cls_only)
        return F.normalize(fp32_head(self.text_proj, hidden[:, 0, :]), dim=-1)

    def image_kv(self, image_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer cross-attention keys/values of image tokens, to reuse across texts."""
        return self.text_encoder.image_kv(image_embeds)

    def match_logits(self, itm_input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     image_embeds: Optional[torch.Tensor] = None,
                     image_kv: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]] = None,
                     cls_only: bool = True) -> torch.Tensor:
        """Image-text matching logits (B, 2) (class 1 = match); ids must start with `[ENC]`.

        `cls_only=False` runs the last layer over every token, as the original did (same values up to rounding).
        """
        hidden = self.text_encoder(itm_input_ids, attention_mask, image_embeds=image_embeds, image_kv=image_kv,
                                   cls_only=cls_only)
        return fp32_head(self.itm_head, hidden[:, 0, :])

    def match_logits_packed(self, pairs: PackedPairs, image_kv: Sequence[tuple[torch.Tensor, torch.Tensor]]
                            ) -> torch.Tensor:
        """`match_logits` of packed pairs (models/packed.py): `image_kv` holds the keys/values of their images."""
        return fp32_head(self.itm_head, first_token_hidden(self.text_encoder, pairs, image_kv))

    # ------------------------------------------------------------------ training
    def forward(self, image: torch.Tensor, caption, alpha: float, idx: torch.Tensor,
                ranks: Optional[Ranks] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The original call: `caption` is a list of strings or a pre-tokenized (input_ids, attention_mask)."""
        input_ids, attention_mask = self._as_tokens(caption)
        out = self.forward_train(image, input_ids, attention_mask, alpha, idx, ranks)
        return out.loss_ita, out.loss_itm

    def forward_train(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      alpha: float, idx: torch.Tensor, ranks: Optional[Ranks] = None) -> TrainOutputs:
        """One rank's part of a training step, in the original's order of computation and of random draws.

        `ranks` says how this batch meets the other ranks' batches (default: `Ranks()`, one process per rank).
        """
        ranks = ranks or Ranks()
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        idx = idx.view(-1)
        if self.fast_path and not self.negative_all_rank:  # all ranks' ids are gathered: keep one length
            input_ids, attention_mask = trim_padding(input_ids, attention_mask)
        image_embeds, image_feat = self.encode_image(image)
        # The straightforward path computes every token in the last layer too, as the original (and draws the
        # same dropout masks); the fast path only the first token, the only one the losses read.
        text_feat = self.encode_text(input_ids, attention_mask, cls_only=self.fast_path)
        with torch.no_grad():
            image_feat_m, text_feat_m = ranks.momentum_features(self, image, input_ids, attention_mask)
        loss_ita = self.contrastive_loss(image_feat, text_feat, image_feat_m, text_feat_m, idx, alpha)
        ranks.share_momentum_features(self, image_feat_m, text_feat_m, idx)

        itm_ids = with_enc_token(input_ids, self.enc_token_id)
        logits_pos = None
        if not self.fast_path:  # the original's order: positives first (their dropout draws precede sampling)
            logits_pos = self.match_logits(itm_ids, attention_mask, image_embeds=image_embeds, cls_only=False)
        candidates = ranks.negative_candidates(self, idx, image_feat, text_feat, image_embeds, itm_ids, attention_mask)
        neg_image_idx, neg_text_idx, no_negative = ranks.hard_negatives(self, idx, image_feat, text_feat, candidates)
        itm_logits = self.itm_logits(image_embeds, itm_ids, attention_mask, candidates, neg_image_idx, neg_text_idx,
                                     logits_pos)
        loss_itm = itm_loss(itm_logits, image.shape[0], no_negative)
        return TrainOutputs(loss_ita, loss_itm, itm_logits, neg_image_idx, neg_text_idx, no_negative)

    def contrastive_loss(self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
                         text_feat_m: torch.Tensor, idx: torch.Tensor, alpha: float) -> torch.Tensor:
        """ITC against the batch's momentum features followed by the queue, positives = same image id."""
        targets = same_id_targets(idx, torch.cat([idx, self.idx_queue[0]]))
        with torch.no_grad():
            image_feat_m_all = torch.cat([image_feat_m.t(), self.image_queue.clone()], dim=1)
            text_feat_m_all = torch.cat([text_feat_m.t(), self.text_queue.clone()], dim=1)
            targets_i2t = distilled_targets(image_feat_m @ text_feat_m_all / self.temp, targets, alpha)
            targets_t2i = distilled_targets(text_feat_m @ image_feat_m_all / self.temp, targets, alpha)
        sim_i2t = image_feat @ text_feat_m_all / self.temp
        sim_t2i = text_feat @ image_feat_m_all / self.temp
        return itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)

    @torch.no_grad()
    def hard_negatives(self, idx: torch.Tensor, image_feat: torch.Tensor, text_feat: torch.Tensor,
                       candidates: NegativeCandidates) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(negative image per text, negative text per image, (2B,) no-negative flags), drawn by similarity.

        A row whose candidates of another image all have weight 0 (every candidate shows its own image, or the
        softmax underflowed) has no negative: the original stopped with `invalid multinomial distribution`. Such a
        row draws from uniform weights instead, so that the random stream advances as for any row, and is flagged:
        its negative pair is left out of the matching loss.
        """
        same_id = idx[:, None] == candidates.idx[None, :]
        weights_i2t = hard_negative_weights(image_feat @ candidates.text_feat.t() / self.temp, same_id)
        weights_t2i = hard_negative_weights(text_feat @ candidates.image_feat.t() / self.temp, same_id)
        no_image, no_text = weights_t2i.sum(dim=1) == 0, weights_i2t.sum(dim=1) == 0
        weights_t2i = weights_t2i.masked_fill(no_image[:, None], 1.0)  # no host sync: a no-op for valid rows
        weights_i2t = weights_i2t.masked_fill(no_text[:, None], 1.0)
        neg_image_idx, neg_text_idx = self.sample_hard_negatives(weights_t2i, weights_i2t)
        return neg_image_idx, neg_text_idx, torch.cat([no_image, no_text])

    def itm_logits(self, image_embeds: torch.Tensor, itm_ids: torch.Tensor, attention_mask: torch.Tensor,
                   candidates: NegativeCandidates, neg_image_idx: torch.Tensor, neg_text_idx: torch.Tensor,
                   logits_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Matching logits (3B, 2) of the positives and of one hard negative per text and per image.

        The straightforward path passes `logits_pos`, computed before sampling as the original does, so in train
        mode it draws the same dropout masks and negatives from the same seed. The fast path scores all 3B rows in
        one pass after sampling: the same distribution, another order of random draws.
        """
        # index_select, not x[idx]: the backward of advanced indexing adds the gradients of repeated negatives
        # with parallel atomics on the CPU, in a different order each run; index_select's backward does not.
        neg_ids = candidates.input_ids.index_select(0, neg_text_idx)
        neg_mask = candidates.attention_mask.index_select(0, neg_text_idx)
        # Rows: (text b, image b), (text b, its negative image), (negative text of image b, image b).
        ids = torch.cat([itm_ids, itm_ids, neg_ids])
        mask = torch.cat([attention_mask, attention_mask, neg_mask])
        batch = image_embeds.shape[0]
        if self.fast_path:  # each image's keys/values once, shared by all its rows; packed rows, no padding
            local = torch.arange(batch, device=ids.device)
            if candidates.image_embeds is image_embeds:  # negatives from this batch
                images, pair_image = image_embeds, torch.cat([local, neg_image_idx, local])
            else:  # the negative images' tokens come from other ranks: their keys/values are computed here
                images = torch.cat([image_embeds, candidates.image_embeds.index_select(0, neg_image_idx)])
                pair_image = torch.cat([local, local + batch, local])
            return self._match_logits_by_image(ids, mask, pair_image, images)
        # The straightforward path: each pass projects its image tokens again.
        images_neg = torch.cat([candidates.image_embeds.index_select(0, neg_image_idx), image_embeds])
        logits_neg = self.match_logits(ids[batch:], mask[batch:], image_embeds=images_neg, cls_only=False)
        return torch.cat([logits_pos, logits_neg])

    def _match_logits_by_image(self, ids: torch.Tensor, mask: torch.Tensor, pair_image: torch.Tensor,
                               image_embeds: torch.Tensor) -> torch.Tensor:
        """Matching logits of the rows (ids[r], image_embeds[pair_image[r]]), packed by image (one host sync for
        the sizes), in the order of the rows: first token only in the last layer."""
        order = torch.argsort(pair_image, stable=True)
        lengths = mask.sum(dim=1).index_select(0, order)
        host_lengths, host_images = torch.stack([lengths, pair_image.index_select(0, order)]).cpu()
        pairs_per_image = torch.bincount(host_images, minlength=image_embeds.shape[0]).tolist()
        pairs = pack_pairs(ids, order, lengths, host_lengths, pairs_per_image)
        logits = self.match_logits_packed(pairs, self.image_kv(image_embeds))
        return logits.index_select(0, torch.argsort(order))

    def sample_hard_negatives(self, weights_t2i: torch.Tensor, weights_i2t: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One negative image per text, then one negative text per image (the original's RNG order)."""
        neg_image_idx = torch.multinomial(weights_t2i, 1).squeeze(1)
        neg_text_idx = torch.multinomial(weights_i2t, 1).squeeze(1)
        return neg_image_idx, neg_text_idx

    # ------------------------------------------------------------------ momentum encoders and queues
    def _momentum_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        online = [p for name, _ in MOMENTUM_PAIRS for p in getattr(self, name).parameters()]
        momentum = [p for _, name in MOMENTUM_PAIRS for p in getattr(self, name).parameters()]
        return online, momentum

    @torch.no_grad()
    def _copy_to_momentum(self) -> None:
        online, momentum = self._momentum_params()
        for p, p_m in zip(online, momentum):
            p_m.copy_(p)
            p_m.requires_grad_(False)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """p_m <- momentum * p_m + (1 - momentum) * p, in place on every momentum parameter."""
        online, momentum = self._momentum_params()
        torch._foreach_lerp_(momentum, online, 1.0 - self.momentum)

    @torch.no_grad()
    def momentum_features(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized contrastive features of the momentum encoders, (B, embed_dim) each."""
        image_feat_m = F.normalize(fp32_head(self.vision_proj_m, self.visual_encoder_m(image)[:, 0, :]), dim=-1)
        text_hidden_m = self.text_encoder_m(input_ids, attention_mask, cls_only=self.fast_path)
        return image_feat_m, F.normalize(fp32_head(self.text_proj_m, text_hidden_m[:, 0, :]), dim=-1)

    @torch.no_grad()
    def enqueue(self, image_feats: torch.Tensor, text_feats: torch.Tensor, idx_world: torch.Tensor) -> None:
        """Write the momentum features of all ranks (gathered, in rank order) at the queue pointer and advance it."""
        batch = image_feats.shape[0]
        if self.queue_size % batch:
            raise ValueError(f'queue_size {self.queue_size} must be divisible by the global batch size {batch}')
        # Index arithmetic on the device: no host sync to read the pointer.
        slots = self.ptr_queue + torch.arange(batch, device=self.ptr_queue.device)
        self.image_queue.index_copy_(1, slots, image_feats.t().to(self.image_queue.dtype))
        self.text_queue.index_copy_(1, slots, text_feats.t().to(self.text_queue.dtype))
        self.idx_queue.index_copy_(1, slots, idx_world.view(1, -1).to(self.idx_queue.dtype))
        self.ptr_queue.copy_((self.ptr_queue + batch) % self.queue_size)

    def _as_tokens(self, caption) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(caption, (list, tuple)) and caption and isinstance(caption[0], str):
            return self.tokenize(caption)
        input_ids, attention_mask = caption
        return input_ids, attention_mask


def fp32_head(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A small output layer in fp32, even under bf16 autocast (costs nothing next to the encoders).

    Its outputs are compared with each other: contrastive similarities and matching logits rank the candidates,
    and bf16's 8-bit mantissa would round them to about 3 digits, enough to reorder near-ties.
    """
    with torch.autocast(x.device.type, enabled=False):
        return head(x.float())


def _bert_config(med_config: Union[str, Mapping, BertConfig], vision_width: int) -> BertConfig:
    if isinstance(med_config, BertConfig):
        config = med_config
    elif isinstance(med_config, Mapping):
        config = BertConfig(**med_config)
    else:
        config = load_med_config(med_config)
    config.encoder_width = vision_width  # cross-attention keys/values come from the ViT
    return config


def model_from_config(config: Mapping, pretrained: Optional[str] = None) -> BLIP_Retrieval:
    """The model a validated run config describes (config.load_config), with `pretrained` loaded.

    `pretrained` overrides the config's (a resumed run passes '': its weights come from checkpoint_last.pth).
    """
    return blip_retrieval(
        pretrained=config['pretrained'] if pretrained is None else pretrained,
        med_config=config['med_config'], image_size=config['image_size'], vit=config['vit'],
        vit_grad_ckpt=config['vit_grad_ckpt'], vit_ckpt_layer=config['vit_ckpt_layer'],
        embed_dim=config['embed_dim'], queue_size=config['queue_size'], momentum=config['momentum'],
        negative_all_rank=config['negative_all_rank'], tokenizer=config['tokenizer'],
        sha256=config['sha256'], allow_unsafe_checkpoint=config['allow_unsafe_checkpoint'])


def blip_retrieval(pretrained: str = '', **kwargs) -> BLIP_Retrieval:
    """Build `BLIP_Retrieval(**kwargs)` and load `pretrained` (URL, path, HF folder or Hub id) if given.

    Extra keys for loading: `sha256` (verify the file), `allow_unsafe_checkpoint` (fall back to a full
    pickle load for files that are not plain tensors — only for files you trust).
    """
    sha256 = kwargs.pop('sha256', None)
    allow_unsafe = kwargs.pop('allow_unsafe_checkpoint', False)
    model = BLIP_Retrieval(**kwargs)
    if pretrained:
        # A Hugging Face Hub id (`owner/name[@revision]`) or save_pretrained folder, else a .pth path or URL.
        load = load_hf_pretrained if is_hf_source(pretrained) else load_pretrained
        model.load_report = load(model, pretrained, sha256=sha256, allow_unsafe=allow_unsafe)
    return model

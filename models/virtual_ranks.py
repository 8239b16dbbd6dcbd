"""Several ranks of one training step, played in turn by one process: `accum_steps` that computes a step exactly as
P x N processes would.

With P processes and accum_steps N, process p plays the virtual ranks v = p*N ... p*N+N-1, one micro-batch each.
Plain gradient accumulation would be another recipe, because three things tie the batches of a BLIP step together:
  * the momentum encoders are updated once per step, before any rank computes its momentum features;
  * every rank's contrastive loss sees the queue as it was before the step, and the step then enqueues all ranks'
    momentum features at once, in rank order;
  * with `negative_all_rank`, every rank draws its hard negatives from the batches of all ranks, and a negative's
    gradient reaches the image encoder of the rank that owns it.
`VirtualStep` holds what the virtual ranks of a step share; `VirtualRank` is the `Ranks` view of one of them that
`forward_train` uses. Collectives go through utils. Each virtual rank's random stream is the trainer's to swap in
(run/training.py); here only two jumps inside a recomputed forward (below) move the torch generators.

All-rank negatives in two passes. A rank's negatives come from the whole step's batch, which one process has only
once all of its micro-batches ran, and the gradient of a negative must reach its owner. Keeping every micro-batch's
activations until the end of the step would multiply memory by N, so each micro-batch is computed twice:
  1. `probe` (no gradients): image tokens, contrastive features, momentum features (and, on the straightforward
     path, the positives' matching logits, whose dropout draws precede the sampling). `share_probes` gathers them
     from every process: the step's candidates, as a real run's all-gathers would give them. `probe_negatives`
     draws the micro-batch's negatives from them and runs its matching pass with gradients for the candidates'
     image tokens only: how its loss pulls on the images of the other ranks. `share_received_gradients` sums these
     over all ranks (one all-reduce): for every image, what the other ranks' losses send it.
  2. the forward again, with gradients, from the same point of the rank's stream: the same dropout masks. The
     momentum features and the negatives are known already: the stream jumps past their draws. The micro-batch's
     image tokens enter the candidates through `_OwnedCandidates`, whose backward adds what the other ranks sent
     to this rank's own share, as a real all-gather's backward (an all-reduce) does.
Memory per process: one micro-batch's activations, plus the step's cached image tokens (as many as a real run's
all-gather holds on each GPU) and their gradients. Without `negative_all_rank` a step is a single pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

import utils
from models.blip_retrieval import BLIP_Retrieval, NegativeCandidates, Ranks, gather_batch
from models.losses import itm_loss
from models.tokenizer import with_enc_token


def generator_state(device: torch.device) -> tuple:
    """The torch generators a forward draws from (the CPU's, and the device's on a GPU)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == 'cuda' else None


def set_generator_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@dataclass
class _Probe:
    """Pass 1 of one micro-batch (all-rank negatives): what its pass 2 and the other ranks need."""
    idx: torch.Tensor
    image_feat: torch.Tensor
    text_feat: torch.Tensor
    image_embeds: torch.Tensor
    itm_ids: torch.Tensor
    attention_mask: torch.Tensor
    logits_pos: Optional[torch.Tensor]  # the straightforward path's positives (values only)
    momentum: tuple[torch.Tensor, torch.Tensor]
    after_momentum: tuple  # generator state after the momentum features
    negatives: Optional[tuple] = None  # (neg_image_idx, neg_text_idx, no_negative)
    after_sampling: Optional[tuple] = None  # generator state after drawing the negatives


class VirtualStep:
    """What the virtual ranks of one optimizer step share: the momentum features to enqueue at its end and, with
    all-rank negatives, the candidates and the gradients the ranks send each other's images.

    Use: `begin()`; with all-rank negatives (`all_rank`), `probe(j, ...)` for every micro-batch,
    `share_probes()`, `probe_negatives(j)` for every micro-batch, `share_received_gradients()`; then
    `forward_train(..., ranks=step.rank(j))` and its backward for every micro-batch; `finish()`. The trainer gives
    micro-batch j its virtual rank's random stream for each of these calls, from the stream's state at the start of
    the step for `probe` and for the forward (see the module docstring).
    """

    def __init__(self, model: BLIP_Retrieval, accum_steps: int):
        self.model = model
        self.accum_steps = accum_steps
        self.first_rank = utils.get_rank() * accum_steps
        self.all_rank = model.negative_all_rank and utils.get_world_size() * accum_steps > 1
        self.momentum: list[Optional[tuple]] = [None] * accum_steps  # (image_feat_m, text_feat_m, idx)
        self.probes: list[Optional[_Probe]] = [None] * accum_steps
        self.candidates: Optional[NegativeCandidates] = None
        self.received: Optional[torch.Tensor] = None  # gradients the other ranks send each candidate image

    def begin(self) -> None:
        """Once per step, before any micro-batch: the momentum encoders move once, as on every real rank."""
        with torch.no_grad():
            self.model.temp.clamp_(0.001, 0.5)
            self.model.momentum_update()

    def rank(self, j: int) -> 'VirtualRank':
        return VirtualRank(self, j)

    def own_rows(self, j: int) -> slice:
        """Micro-batch j's rows in the step's candidates (virtual-rank order)."""
        batch = self.probes[j].idx.shape[0]
        start = (self.first_rank + j) * batch
        return slice(start, start + batch)

    @torch.no_grad()
    def probe(self, j: int, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              idx: torch.Tensor) -> None:
        """Pass 1 of micro-batch j, drawing what `forward_train` draws before the negatives (no trimming: all-rank)."""
        model = self.model
        image_embeds, image_feat = model.encode_image(image)
        text_feat = model.encode_text(input_ids, attention_mask, cls_only=model.fast_path)
        momentum = model.momentum_features(image, input_ids, attention_mask)
        after_momentum = generator_state(image.device)
        itm_ids = with_enc_token(input_ids, model.enc_token_id)
        logits_pos = None if model.fast_path else model.match_logits(itm_ids, attention_mask,
                                                                      image_embeds=image_embeds, cls_only=False)
        self.probes[j] = _Probe(idx.view(-1), image_feat, text_feat, image_embeds, itm_ids, attention_mask,
                                logits_pos, momentum, after_momentum)

    def share_probes(self) -> None:
        """The step's negative candidates: every micro-batch of every process, in virtual-rank order."""
        field = lambda name: gather_batch(torch.cat([getattr(probe, name) for probe in self.probes]))
        self.candidates = NegativeCandidates(field('idx'), field('image_feat'), field('text_feat'),
                                             field('image_embeds'), field('itm_ids'), field('attention_mask'))
        for j, probe in enumerate(self.probes):  # the gathered copy serves from now on
            probe.image_embeds = self.candidates.image_embeds[self.own_rows(j)]
        self.received = torch.zeros_like(self.candidates.image_embeds)

    def probe_negatives(self, j: int) -> None:
        """Micro-batch j's negatives, and the gradient of its matching loss for the other ranks' image tokens."""
        model, probe = self.model, self.probes[j]
        probe.negatives = model.hard_negatives(probe.idx, probe.image_feat, probe.text_feat, self.candidates)
        probe.after_sampling = generator_state(probe.idx.device)
        images = self.candidates.image_embeds.detach().requires_grad_()
        with torch.enable_grad():
            candidates = dataclasses.replace(self.candidates, image_embeds=images)
            logits = model.itm_logits(probe.image_embeds, probe.itm_ids, probe.attention_mask, candidates,
                                      probe.negatives[0], probe.negatives[1], probe.logits_pos)
            (sent,) = torch.autograd.grad(itm_loss(logits, probe.idx.shape[0], probe.negatives[2]), images)
        sent[self.own_rows(j)] = 0  # its own images get this through pass 2's graph
        self.received += sent

    def share_received_gradients(self) -> None:
        utils.all_reduce_sum_(self.received)

    @torch.no_grad()
    def finish(self) -> None:
        """Enqueue the momentum features of every virtual rank, in rank order, as one real step would."""
        image_feat_m, text_feat_m, idx = (torch.cat(parts) for parts in zip(*self.momentum))
        self.model.enqueue(gather_batch(image_feat_m), gather_batch(text_feat_m), gather_batch(idx))


class VirtualRank(Ranks):
    """Micro-batch j of a `VirtualStep`, as `forward_train` sees the other ranks."""

    def __init__(self, step: VirtualStep, j: int):
        self.step, self.j = step, j
        self.probe = step.probes[j]

    def momentum_features(self, model, image, input_ids, attention_mask):
        if self.probe is None:  # updated once by VirtualStep.begin
            return model.momentum_features(image, input_ids, attention_mask)
        set_generator_state(image.device, self.probe.after_momentum)  # computed in pass 1: skip their draws
        return self.probe.momentum

    def share_momentum_features(self, model, image_feat_m, text_feat_m, idx):
        self.step.momentum[self.j] = (image_feat_m, text_feat_m, idx)  # enqueued by VirtualStep.finish

    def negative_candidates(self, model, idx, image_feat, text_feat, image_embeds, itm_ids, attention_mask):
        if self.probe is None:
            return super().negative_candidates(model, idx, image_feat, text_feat, image_embeds, itm_ids,
                                               attention_mask)
        candidates, rows = self.step.candidates, self.step.own_rows(self.j)
        images = _OwnedCandidates.apply(image_embeds, candidates.image_embeds, rows, self.step.received[rows])
        return dataclasses.replace(candidates, image_embeds=images)

    def hard_negatives(self, model, idx, image_feat, text_feat, candidates):
        if self.probe is None:
            return super().hard_negatives(model, idx, image_feat, text_feat, candidates)
        set_generator_state(idx.device, self.probe.after_sampling)  # drawn in pass 1: skip the draws
        self.no_negative = self.probe.negatives[2]
        return self.probe.negatives


class _OwnedCandidates(torch.autograd.Function):
    """The step's candidate image tokens with this rank's own rows taken from its live forward.

    Backward: the own rows' gradient plus what the other ranks' losses sent them (pass 1), summed as a real
    all-gather's backward sums every rank's gradient of those rows.
    """

    @staticmethod
    def forward(ctx, own: torch.Tensor, candidates: torch.Tensor, rows: slice, received: torch.Tensor
                ) -> torch.Tensor:
        ctx.rows, ctx.received = rows, received
        return torch.cat([candidates[:rows.start], own, candidates[rows.stop:]])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.rows] + ctx.received, None, None, None

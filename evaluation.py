"""BLIP's retrieval evaluation protocol and recall metrics.

A module of its own (not in train_retrieval.py) because training, `--evaluate` and the benchmarks all use it.
Written by hand: the protocol (contrastive top-k, then matching re-rank) is BLIP's, no library has it.

Protocol: contrastive features for every image and text; for each image the `k_test` texts with the highest
similarity (and for each text the `k_test` best images) are re-scored as matching logit (class 1) + similarity;
every other entry is -100.

`k_test: 0` is the contrastive-only protocol (`itc`): the score is the similarity itself, the matching head
never runs (a quick look, or a sweep); any other `k_test` is the paper's protocol (`itm`).

Two paths compute the same matrices:
- `reference`: the original's loop, one query at a time, projecting the image tokens for every pair.
- `fast`: every distinct (image, text) pair of both directions is scored once, in packed batches of pairs grouped
  by image (no padding), with each image's cross-attention keys/values computed once; pairs are split evenly
  across ranks. The text encoder's last layer computes only the first token, the one that is scored.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch

import utils
from data.loaders import batches_of, create_eval_loader, shard_range
from models import packed
from models.tokenizer import MAX_TEXT_LENGTH, tokenize, with_enc_token
from run.progress import ProgressLogger

_logger = logging.getLogger(__name__)

SCORE_FILL = -100.0
TEXT_BATCH = 256
# Pairs per matching forward: a GPU needs large batches to outrun the host's kernel launches; a 2-core CPU
# is faster with batches that stay in its caches (benchmarks/bench_eval.py --batch).
DEFAULT_PAIR_BATCH = {'cuda': 1024, 'cpu': 256}


def protocol(k_test: int) -> str:
    """'itc' for `k_test` 0 (score = contrastive similarity, no matching head), else 'itm' (top-k re-ranked)."""
    return 'itc' if k_test == 0 else 'itm'


def describe_protocol(k_test: int) -> str:
    """The protocol in words, for summaries and the report: 'protocol: itm (k_test 128: ...)'."""
    if k_test == 0:
        return 'protocol: itc (k_test 0: score = contrastive similarity, no matching head)'
    return f'protocol: itm (k_test {k_test}: the matching head re-ranks each query\'s {k_test} best by similarity)'


def pair_batch_for(device: torch.device, pair_batch: Optional[int] = None) -> int:
    """`eval_pair_batch` as given, or the default of the device type (null in the config)."""
    return pair_batch or DEFAULT_PAIR_BATCH.get(device.type, 1024)


# ---------------------------------------------------------------------------------------------- features
@torch.no_grad()
def text_features(model, texts: list[str], device: torch.device, autocast: Callable = None, cls_only: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text_feat (T, E), matching ids with [ENC] (T, MAX_TEXT_LENGTH), attention mask (T, MAX_TEXT_LENGTH)) for all texts.

    Each rank encodes an equal shard; the results are gathered on every rank. `cls_only=False`: the original's
    full last layer (see `BLIP_Retrieval.encode_text`).
    """
    start, end = shard_range(len(texts), utils.get_rank(), utils.get_world_size())
    feats, ids, masks = [], [], []
    for i in range(start, end, TEXT_BATCH):
        input_ids, mask = tokenize(model.tokenizer, texts[i:min(end, i + TEXT_BATCH)], device)
        with utils.autocast_context(autocast):
            feats.append(model.encode_text(input_ids, mask, cls_only=cls_only).float())
        ids.append(with_enc_token(input_ids, model.enc_token_id))
        masks.append(mask)
    embed_dim = model.text_proj.out_features
    cat = lambda xs, shape, dtype: torch.cat(xs) if xs else torch.zeros(shape, dtype=dtype, device=device)
    return (utils.all_gather_cat(cat(feats, (0, embed_dim), torch.float32)),
            utils.all_gather_cat(cat(ids, (0, MAX_TEXT_LENGTH), torch.long)),
            utils.all_gather_cat(cat(masks, (0, MAX_TEXT_LENGTH), torch.long)))


@torch.no_grad()
def image_features(model, loader: Iterable, device: torch.device, autocast: Callable = None, with_tokens: bool = True
                   ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """(image tokens (N, 1+P, D), image_feat (N, E)) for all images; `loader` yields this rank's shard.

    `with_tokens=False` (the contrastive-only protocol): the tokens are neither kept nor gathered (None).

    Under bf16 autocast the image tokens are kept in bf16: the matching passes only read them through the
    cross-attention key/value projections, which autocast feeds bf16 anyway, so the fast path's scores are
    bit-identical while every GPU holds (and the gather moves) half the bytes (COCO's 5,000 test images x 577
    tokens x 768 values: 4.4 instead of 8.9 GB).
    """
    with utils.autocast_context(autocast):
        tokens_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    embeds, feats = [], []
    with batches_of(loader) as batches:
        for image, _ in batches:
            with utils.autocast_context(autocast):
                image_embeds, image_feat = model.encode_image(image.to(device, non_blocking=True))
            if with_tokens:
                embeds.append(image_embeds.to(tokens_dtype or image_embeds.dtype))
            feats.append(image_feat.float())
    if not feats:  # an empty shard still joins the gathers, with the others' shape and dtype
        tokens = model.visual_encoder.pos_embed.shape[1]
        width = model.visual_encoder.embed_dim
        embeds = [torch.zeros((0, tokens, width), dtype=tokens_dtype or torch.float32, device=device)]
        feats = [torch.zeros((0, model.vision_proj.out_features), device=device)]
    return utils.all_gather_cat(torch.cat(embeds)) if with_tokens else None, utils.all_gather_cat(torch.cat(feats))


# ---------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def reference_scores(model, image_embeds, image_feat, text_feat, text_ids, text_mask, k_test: int,
                     autocast: Callable = None, log_every: int = 50, query_fraction: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward path: one query at a time, as the original (rows split across ranks).

    `query_fraction` < 1 scores only the first rows of each direction (benchmarks extrapolate from them).
    """
    sims = image_feat @ text_feat.t()
    n_images, n_texts = sims.shape
    rank, world = utils.get_rank(), utils.get_world_size()
    i2t = sims.new_full((n_images, n_texts), SCORE_FILL)
    t2i = sims.new_full((n_texts, n_images), SCORE_FILL)
    k_i2t, k_t2i = min(k_test, n_texts), min(k_test, n_images)  # the original crashed when k_test > candidates

    start, end = shard_range(math.ceil(n_images * query_fraction), rank, world)
    progress = ProgressLogger(end - start, 'Evaluation i2t (reference)', log_every)
    for i in progress.iter(range(start, end)):
        top_sim, top_idx = sims[i].topk(k_i2t)
        with utils.autocast_context(autocast):
            # A contiguous copy per query, as the original: every layer's key/value projection is then one addmm
            # (an expanded view would be copied again in each of them).
            logits = model.match_logits(text_ids[top_idx], text_mask[top_idx],
                                        image_embeds=image_embeds[i:i + 1].repeat(k_i2t, 1, 1), cls_only=False)
        i2t[i, top_idx] = logits[:, 1].float() + top_sim

    start, end = shard_range(math.ceil(n_texts * query_fraction), rank, world)
    progress = ProgressLogger(end - start, 'Evaluation t2i (reference)', log_every)
    for j in progress.iter(range(start, end)):
        top_sim, top_idx = sims[:, j].topk(k_t2i)
        with utils.autocast_context(autocast):
            logits = model.match_logits(text_ids[j:j + 1].expand(k_t2i, -1), text_mask[j:j + 1].expand(k_t2i, -1),
                                        image_embeds=image_embeds[top_idx], cls_only=False)
        t2i[j, top_idx] = logits[:, 1].float() + top_sim
    return _merge_rows(i2t), _merge_rows(t2i)


def _merge_rows(scores: torch.Tensor) -> torch.Tensor:
    """Combine the rows each rank filled (the others hold exactly SCORE_FILL) into the full matrix."""
    if utils.get_world_size() == 1:
        return scores
    filled = (scores != SCORE_FILL).to(scores.dtype)
    total = utils.all_reduce_sum_((scores - SCORE_FILL) * filled)
    return total + SCORE_FILL


@dataclass
class _Batch:
    pairs: slice               # its positions in the plan's pair order
    images: slice              # its images, as indices into its block's images (consecutive)
    pairs_per_image: list[int]  # its pairs of each of those images, in order


@dataclass
class _Block:
    images: slice   # its entries in the plan's `block_images`: the images whose keys/values its batches share
    batches: list[_Batch]


@dataclass
class _Plan:
    """The whole schedule of the fast path, built on the host before any scoring.

    Its index tensors go to the device once and every size a batch needs is a host number, so the scoring loop
    never waits for the device (a host-side index per batch would stall the GPU queue at every forward).
    """
    blocks: list[_Block]
    block_images: torch.Tensor  # (I,) images of every block, in block order
    order: torch.Tensor         # (P,) this rank's pairs by (image, caption length): the order they are scored in
    lengths: torch.Tensor       # (P,) their caption lengths, in that order


def _image_blocks(pairs_per_image: list[int], max_pairs: int) -> torch.Tensor:
    """Block of each image: consecutive whole images, a new block once one would exceed `max_pairs` pairs."""
    block_of_image, block, size = [], 0, 0
    for count in pairs_per_image:
        if size and size + count > max_pairs:
            block, size = block + 1, 0
        size += count
        block_of_image.append(block)
    return torch.tensor(block_of_image, dtype=torch.long)


def _plan(pair_images: torch.Tensor, pair_lengths: torch.Tensor, pair_batch: int) -> _Plan:
    """The fast path's schedule of this rank's pairs (`pair_images` sorted; `pair_lengths` their caption lengths).

    1. Pairs by (image, caption length); blocks of whole images, about 4 batches each, whose keys/values are
       computed once.
    2. Batches: `pair_batch` consecutive pairs of a block (the last one of a block fewer). A batch is packed
       (models/packed.py): no padding whatever its lengths, and the pairs of each of its images attend to that
       image's keys/values, a slice of the block's.
    """
    by_length = torch.argsort(pair_lengths, stable=True)
    order = by_length[torch.argsort(pair_images[by_length], stable=True)]  # pair positions by (image, length)
    images, pairs_per_image = torch.unique_consecutive(pair_images[order], return_counts=True)
    block_of_image = _image_blocks(pairs_per_image.tolist(), max_pairs=4 * pair_batch)
    image_of_position = torch.repeat_interleave(torch.arange(images.numel()), pairs_per_image)
    images_per_block = torch.bincount(block_of_image, minlength=int(block_of_image.max()) + 1 if images.numel() else 0)
    first_image_of_block = (torch.cumsum(images_per_block, 0) - images_per_block).tolist()
    first_pair_of_image = (torch.cumsum(pairs_per_image, 0) - pairs_per_image).tolist() + [order.numel()]
    blocks = []
    for first_image, n_images in zip(first_image_of_block, images_per_block.tolist()):
        block = _Block(slice(first_image, first_image + n_images), [])
        block_end = first_pair_of_image[first_image + n_images]
        for start in range(first_pair_of_image[first_image], block_end, pair_batch):
            end = min(start + pair_batch, block_end)
            batch_images, counts = torch.unique_consecutive(image_of_position[start:end], return_counts=True)
            first = int(batch_images[0]) - first_image
            block.batches.append(_Batch(slice(start, end), slice(first, first + batch_images.numel()),
                                        counts.tolist()))
        blocks.append(block)
    return _Plan(blocks, images, order, pair_lengths[order])


@torch.no_grad()
def fast_scores(model, image_embeds, image_feat, text_feat, text_ids, text_mask, k_test: int,
                pair_batch: Optional[int] = None, autocast: Callable = None, log_every: int = 50
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every distinct top-k pair of both directions scored once.

    Pairs are sorted by image and cut into blocks of whole images; each block's cross-attention keys/values
    are computed once, then its pairs run in packed batches of `pair_batch` (models/packed.py): every token of
    every pair once, no padding, the texts of one image attending to its keys/values without a copy.
    """
    device = image_feat.device
    pair_batch = pair_batch_for(device, pair_batch)
    sims = image_feat @ text_feat.t()
    n_images, n_texts = sims.shape
    k_i2t, k_t2i = min(k_test, n_texts), min(k_test, n_images)
    top_i2t = sims.topk(k_i2t, dim=1).indices            # (N, k): texts of each image
    top_t2i = sims.t().topk(k_t2i, dim=1).indices        # (T, k): images of each text

    # Distinct pairs as flat keys image * T + text, sorted: the pairs of one image are adjacent.
    keys_i2t = (torch.arange(n_images, device=device)[:, None] * n_texts + top_i2t).flatten()
    keys_t2i = (top_t2i * n_texts + torch.arange(n_texts, device=device)[:, None]).flatten()
    pair_keys = torch.unique(torch.cat([keys_i2t, keys_t2i]))
    start, end = shard_range(pair_keys.numel(), utils.get_rank(), utils.get_world_size())  # equal shares
    my_keys = pair_keys[start:end].cpu()
    pair_images, pair_texts = my_keys // n_texts, my_keys % n_texts
    plan = _plan(pair_images, text_mask.sum(dim=1).cpu()[pair_texts], pair_batch)
    texts_in_order = pair_texts[plan.order].to(device)
    lengths_in_order = plan.lengths.to(device)
    block_images = plan.block_images.to(device)

    logits_in_order = torch.empty(plan.order.numel(), device=device)
    progress = ProgressLogger(len(plan.blocks), 'Evaluation pairs (fast)', log_every)
    began = time.time()
    for block in progress.iter(plan.blocks):
        with utils.autocast_context(autocast):
            kv = model.image_kv(image_embeds[block_images[block.images]])
        for batch in block.batches:
            pairs = packed.pack_pairs(text_ids, texts_in_order[batch.pairs], lengths_in_order[batch.pairs],
                                      plan.lengths[batch.pairs], batch.pairs_per_image)
            with utils.autocast_context(autocast):
                logits = model.match_logits_packed(pairs, [(k[batch.images], v[batch.images]) for k, v in kv])
            logits_in_order[batch.pairs] = logits[:, 1].float()
    order = plan.order.to(device)
    my_scores = torch.empty_like(logits_in_order)
    my_scores[order] = logits_in_order + sims[pair_images[plan.order].to(device), texts_in_order]
    _logger.info('Scored %d distinct pairs (of %d top-k entries) in %.1f s on this rank', my_keys.numel(),
                 keys_i2t.numel() + keys_t2i.numel(), time.time() - began)

    pair_scores = utils.all_gather_cat(my_scores)  # rank order = key order
    dense = sims.new_full((n_images * n_texts,), SCORE_FILL)
    dense[pair_keys] = pair_scores
    dense = dense.view(n_images, n_texts)
    i2t = sims.new_full((n_images, n_texts), SCORE_FILL).scatter_(1, top_i2t, dense.gather(1, top_i2t))
    t2i = sims.new_full((n_texts, n_images), SCORE_FILL).scatter_(1, top_t2i, dense.t().gather(1, top_t2i))
    return i2t, t2i


@torch.no_grad()
def evaluate_scores(model, loader, texts: list[str], config: dict, device: torch.device,
                    autocast: Callable = None, with_similarity: bool = False) -> tuple[np.ndarray, ...]:
    """Score matrices (images x texts, texts x images) of one split, identical on every rank.

    `with_similarity`: also the contrastive similarities (images x texts), the matrix the top-k came from
    (the report shows each score's two parts: similarity and matching logit = score - similarity).
    """
    model.eval()
    began = time.time()
    reference = config.get('eval_mode', 'fast') == 'reference'
    itc_only = protocol(config['k_test']) == 'itc'
    text_feat, text_ids, text_mask = text_features(model, texts, device, autocast, cls_only=not reference)
    image_embeds, image_feat = image_features(model, loader, device, autocast, with_tokens=not itc_only)
    _logger.info('Encoded %d images and %d texts in %.1f s', image_feat.shape[0], text_feat.shape[0],
                 time.time() - began)
    args = (model, image_embeds, image_feat, text_feat, text_ids, text_mask, config['k_test'])
    log_every = config.get('log_every', 50)
    if itc_only:  # the similarity is the score of every pair: nothing to re-rank
        i2t = image_feat @ text_feat.t()
        t2i = i2t.t().contiguous()
    elif reference:
        i2t, t2i = reference_scores(*args, autocast=autocast, log_every=log_every)
    else:
        i2t, t2i = fast_scores(*args, pair_batch=config.get('eval_pair_batch'), autocast=autocast,
                               log_every=log_every)
    _logger.info('Evaluation time %.1f s', time.time() - began)
    if with_similarity:
        return i2t.cpu().numpy(), t2i.cpu().numpy(), (image_feat @ text_feat.t()).cpu().numpy()
    return i2t.cpu().numpy(), t2i.cpu().numpy()


@dataclass
class SplitScores:
    """One split as the evaluation left it, identical on every rank (what the report is made of)."""
    i2t: np.ndarray   # (N, T) images x texts: matching logit + similarity for each image's top k_test, else -100
                      # (k_test 0: the similarity of every pair)
    t2i: np.ndarray   # (T, N) texts x images, likewise
    sims: np.ndarray  # (N, T) contrastive similarities
    metrics: dict     # recall_metrics of i2t / t2i


def evaluate_split(model, dataset, config: dict, device: torch.device, autocast: Callable = None,
                   keep_scores: Optional[list] = None) -> dict:
    """Recall metrics of one evaluation split (a RetrievalEvalDataset): every rank encodes its share of the images.

    Rank 0 appends the split's SplitScores to `keep_scores` when one is given (for the report).
    """
    loader = create_eval_loader(dataset, config['batch_size_test'], config['num_workers'], utils.get_rank(),
                                utils.get_world_size())
    keep = keep_scores is not None and utils.is_main_process()
    scores = evaluate_scores(model, loader, dataset.text, config, device, autocast, with_similarity=keep)
    metrics = recall_metrics(scores[0], scores[1], dataset.txt2img, dataset.img2txt)
    if keep:
        keep_scores.append(SplitScores(*scores, metrics))
    return metrics


# ---------------------------------------------------------------------------------------------- metrics
def _ranks_of(scores: np.ndarray) -> np.ndarray:
    """rank[q, c] = position of candidate c in query q's ranking (0 = best).

    Ties are ordered as the original did, by `np.argsort(score)[::-1]`.
    """
    order = np.argsort(scores, axis=1)[:, ::-1]
    ranks = np.empty(order.shape, dtype=np.int64)
    np.put_along_axis(ranks, order, np.arange(scores.shape[1])[None, :].repeat(scores.shape[0], 0), axis=1)
    return ranks


def retrieval_ranks(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: dict, img2txt: dict
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-query rank of the ground truth: an image's rank is the best rank of any of its captions."""
    ranks_i2t = _ranks_of(scores_i2t)
    best_i2t = np.array([ranks_i2t[i, img2txt[i]].min() for i in range(scores_i2t.shape[0])])
    ranks_t2i = _ranks_of(scores_t2i)
    targets = np.array([txt2img[t] for t in range(scores_t2i.shape[0])])
    return best_i2t, ranks_t2i[np.arange(len(targets)), targets]


def recall_metrics(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: dict, img2txt: dict) -> dict:
    """txt_r1/5/10, txt_r_mean, img_r1/5/10, img_r_mean, r_mean in percent (BLIP's `itm_eval` keys)."""
    ranks_i2t, ranks_t2i = retrieval_ranks(scores_i2t, scores_t2i, txt2img, img2txt)
    recall = lambda ranks, k: 100.0 * float(np.mean(ranks < k))
    tr = [recall(ranks_i2t, k) for k in (1, 5, 10)]
    ir = [recall(ranks_t2i, k) for k in (1, 5, 10)]
    txt_r_mean, img_r_mean = sum(tr) / 3, sum(ir) / 3
    return {'txt_r1': tr[0], 'txt_r5': tr[1], 'txt_r10': tr[2], 'txt_r_mean': txt_r_mean,
            'img_r1': ir[0], 'img_r5': ir[1], 'img_r10': ir[2], 'img_r_mean': img_r_mean,
            'r_mean': (txt_r_mean + img_r_mean) / 2}


def chance_recall(txt2img: dict, img2txt: dict) -> dict:
    """The expected recall metrics of a random ranking (same keys as `recall_metrics`), to read results against.

    Text -> image: one right image among N, R@K = K/N. Image -> text: c right captions among T, R@K = 1 - the
    chance that none of them is among the K drawn, C(T-c, K)/C(T, K), averaged over the images.
    """
    n_images, n_texts = len(img2txt), len(txt2img)

    def none_in_top(right: int, k: int) -> float:
        p = 1.0
        for j in range(min(k, n_texts)):
            p *= max(0, n_texts - right - j) / (n_texts - j)
        return p

    tr = [100.0 * float(np.mean([1.0 - none_in_top(len(texts), k) for texts in img2txt.values()])) for k in (1, 5, 10)]
    ir = [100.0 * min(k, n_images) / n_images for k in (1, 5, 10)]
    txt_r_mean, img_r_mean = sum(tr) / 3, sum(ir) / 3
    return {'txt_r1': tr[0], 'txt_r5': tr[1], 'txt_r10': tr[2], 'txt_r_mean': txt_r_mean,
            'img_r1': ir[0], 'img_r5': ir[1], 'img_r10': ir[2], 'img_r_mean': img_r_mean,
            'r_mean': (txt_r_mean + img_r_mean) / 2}


def format_recall(metrics: dict) -> str:
    """One readable line, rounded: 'r_mean 75.57 | TR@1/5/10 68.00 92.00 96.00 | IR@1/5/10 ...'."""
    return (f"r_mean {metrics['r_mean']:.2f} | TR@1/5/10 {metrics['txt_r1']:.2f} {metrics['txt_r5']:.2f} "
            f"{metrics['txt_r10']:.2f} | IR@1/5/10 {metrics['img_r1']:.2f} {metrics['img_r5']:.2f} "
            f"{metrics['img_r10']:.2f}")

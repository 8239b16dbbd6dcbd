"""Evaluation speed: the straightforward per-query re-ranking vs the fast pair-batched path.

Same process, same random-weight model, same inputs (random images, caption-like token ids padded to 35 tokens,
true lengths per --lengths).
Both paths start from the same contrastive features (computed once, timed apart).

    python benchmarks/bench_eval.py --vit base --images 16 --texts 80 --k_test 16 --device cpu
    python benchmarks/bench_eval.py --images 1000 --texts 5000 --k_test 128 --precision bf16 --reference_fraction 0.02

The last line is `speedup <ratio>x max_abs_diff <value>`. With --reference_fraction < 1 the reference path
scores only that fraction of the queries of each direction; its time is extrapolated linearly (per query
cost is constant) and the difference is measured on those rows.

Before the last line, one `flops <path>:` line per path: useful FLOPs (distinct pairs at their true lengths,
each image's keys/values once), executed FLOPs, achieved rate, plain addmm's rate at the path's own shapes
(measured in this run) and the ratio to the floor (the useful FLOPs at the best of those rates;
benchmarks/flops.py).
`--lengths flickr` draws caption lengths from real Flickr30k captions instead of uniformly over 8..35 tokens.
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from common import (Timer, add_common_args, build_model, count_host_syncs, peak_memory, profile_table,
                    random_images, random_texts, reset_peak, timed_and_counted)
from flops import TextSizes, lines, matching_flops, measure

import evaluation
import utils


@torch.no_grad()
def features(model, images, text_ids, text_mask, autocast, image_batch: int):
    """(image tokens, image features, text features) of the benchmark's inputs (images as evaluation has them)."""
    device = text_ids.device
    batches = [(images[i:i + image_batch], None) for i in range(0, images.shape[0], image_batch)]
    image_embeds, image_feat = evaluation.image_features(model, batches, device, autocast)
    with utils.autocast_context(autocast):
        step = evaluation.TEXT_BATCH
        text_feat = torch.cat([model.encode_text(text_ids[i:i + step], text_mask[i:i + step]).float()
                               for i in range(0, text_ids.shape[0], step)])
    return image_embeds, image_feat, text_feat


def useful_flops(model, image_feat, text_feat, text_mask, k_test: int) -> int:
    """Matching FLOPs of the protocol's distinct pairs at their true lengths (the same for both paths)."""
    sims = image_feat @ text_feat.t()
    n_images, n_texts = sims.shape
    top_i2t = sims.topk(min(k_test, n_texts), dim=1).indices
    top_t2i = sims.t().topk(min(k_test, n_images), dim=1).indices
    keys = torch.cat([(torch.arange(n_images, device=sims.device)[:, None] * n_texts + top_i2t).flatten(),
                      (top_t2i * n_texts + torch.arange(n_texts, device=sims.device)[:, None]).flatten()]).unique()
    lengths = text_mask.sum(dim=1)[keys % n_texts].tolist()
    return matching_flops(lengths, int((keys // n_texts).unique().numel()), TextSizes.of(model))


def compare_with_fp32(args, model, images, text_ids, text_mask, itm_ids, scores) -> None:
    """Everything again in fp32 (features included): largest score difference and recall on both.

    Recall uses a made-up ground truth (text t belongs to image t * images // texts): with random weights
    it is near chance, but any ranking that the lower precision changes shows up as a different metric.
    """
    utils.configure_precision('fp32', text_ids.device)
    image_embeds, image_feat, text_feat = features(model, images, text_ids, text_mask, None, args.image_batch)
    fp32 = evaluation.fast_scores(model, image_embeds, image_feat, text_feat, itm_ids, text_mask, args.k_test,
                                  pair_batch=args.batch, log_every=10**9)
    n_images, n_texts = images.shape[0], text_ids.shape[0]
    txt2img = {t: t * n_images // n_texts for t in range(n_texts)}
    img2txt = {i: [t for t in range(n_texts) if txt2img[t] == i] for i in range(n_images)}
    recalls = [evaluation.recall_metrics(i2t.cpu().numpy(), t2i.cpu().numpy(), txt2img, img2txt)
               for i2t, t2i in (scores, fp32)]
    diff = max(((low - high).abs() * ((low > -100) & (high > -100))).max().item() for low, high in zip(scores, fp32))
    print(f'{args.precision} vs fp32: max_abs_diff {diff:.3g} over entries scored in both, recall identical '
          f'{recalls[0] == recalls[1]} (r_mean {recalls[0]["r_mean"]:.2f} vs {recalls[1]["r_mean"]:.2f})', flush=True)
    utils.configure_precision(args.precision, text_ids.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument('--images', type=int, default=16)
    parser.add_argument('--texts', type=int, default=80)
    parser.add_argument('--k_test', type=int, default=16)
    parser.add_argument('--batch', type=int, default=None,
                        help='pairs per forward in the fast path (eval_pair_batch; default 1024 on GPU, 256 on CPU)')
    parser.add_argument('--image_batch', type=int, default=64)
    parser.add_argument('--reference_fraction', type=float, default=1.0)
    parser.add_argument('--skip_reference', action='store_true')
    parser.add_argument('--compare_fp32', action='store_true',
                        help='also run the fast path in fp32: score difference and recall vs --precision')
    parser.add_argument('--profile', action='store_true', help='print the top operators of the fast path (run again)')
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    autocast = utils.configure_precision(args.precision, device)
    model = build_model(args, queue_size=64).eval()

    images = random_images(args.images, args.image_size, 'cpu', args.seed)
    text_ids, text_mask = random_texts(args.texts, device, args.seed + 1, lengths=args.lengths)
    itm_ids = text_ids.clone()
    itm_ids[:, 0] = model.enc_token_id
    with Timer(device) as t_feat:
        image_embeds, image_feat, text_feat = features(model, images, text_ids, text_mask, autocast, args.image_batch)
    k = args.k_test
    entries = args.images * min(k, args.texts) + args.texts * min(k, args.images)
    inputs = (model, image_embeds, image_feat, text_feat, itm_ids, text_mask, k)
    print(f'setup: {args.vit} {args.image_size}px {args.precision} on {device} '
          f'({torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}), {args.images} images, '
          f'{args.texts} texts ({args.lengths} lengths, mean {text_mask.sum(1).float().mean():.1f} tokens), '
          f'k_test {k}: {entries} top-k entries; features {t_feat.seconds:.2f} s', flush=True)
    useful = useful_flops(model, image_feat, text_feat, text_mask, k)
    matmul_dtype = torch.bfloat16 if args.precision == 'bf16' else torch.float32

    reset_peak(device)
    (fast_i2t, fast_t2i), fast_seconds, executed = timed_and_counted(
        lambda: evaluation.fast_scores(*inputs, pair_batch=args.batch, autocast=autocast, log_every=10**9), device)
    print(f'fast:      wall {fast_seconds:8.2f} s  {entries / fast_seconds:10.1f} entries/s  '
          f'{peak_memory(device)}', flush=True)
    flop_paths = [measure('fast', fast_seconds, useful, executed, device, matmul_dtype)]
    if args.profile:
        run_fast = lambda pair_batch=args.batch: evaluation.fast_scores(*inputs, pair_batch=pair_batch,
                                                                        autocast=autocast, log_every=10**9)
        print(profile_table(run_fast, device), flush=True)
        pair_batches = (evaluation.pair_batch_for(device, args.batch),)
        pair_batches += (max(1, pair_batches[0] // 4),)
        syncs = [count_host_syncs(lambda b=b: run_fast(b), device) for b in pair_batches]
        if syncs[0] is not None:  # waits that grow with the number of batches would idle the GPU between forwards
            print('host syncs of the fast path: ' + ', '.join(f'{n} at {b} pairs per batch'
                                                                for n, b in zip(syncs, pair_batches)), flush=True)
    if args.compare_fp32:
        compare_with_fp32(args, model, images, text_ids, text_mask, itm_ids, (fast_i2t, fast_t2i))
    if args.skip_reference:
        print(lines(flop_paths), flush=True)
        return

    reset_peak(device)
    fraction = args.reference_fraction
    (ref_i2t, ref_t2i), ref_part_seconds, executed = timed_and_counted(
        lambda: evaluation.reference_scores(*inputs, autocast=autocast, log_every=10**9, query_fraction=fraction),
        device)
    n_i, n_t = int(np.ceil(args.images * fraction)), int(np.ceil(args.texts * fraction))
    done = n_i * min(k, args.texts) + n_t * min(k, args.images)
    ref_seconds = ref_part_seconds * entries / done
    note = '' if fraction >= 1 else f' (extrapolated from {done} of {entries} entries)'
    print(f'reference: wall {ref_seconds:8.2f} s  {entries / ref_seconds:10.1f} entries/s  '
          f'{peak_memory(device)}{note}', flush=True)
    flop_paths.append(measure('reference', ref_seconds, useful, executed, device, matmul_dtype,
                              executed_scale=entries / done))
    print(lines(flop_paths), flush=True)
    diff = max((fast_i2t[:n_i] - ref_i2t[:n_i]).abs().max().item(), (fast_t2i[:n_t] - ref_t2i[:n_t]).abs().max().item())
    print(f'speedup {ref_seconds / fast_seconds:.2f}x max_abs_diff {diff:.3g}', flush=True)


if __name__ == '__main__':
    main()

"""Evaluation speed: the straightforward per-query re-ranking vs the fast pair-batched path.

Same process, same random-weight model, same inputs (random images, caption-like token ids of 35 tokens).
Both paths start from the same contrastive features (computed once, timed apart).

    python benchmarks/bench_eval.py --vit base --images 16 --texts 80 --k_test 16 --device cpu
    python benchmarks/bench_eval.py --images 1000 --texts 5000 --k_test 128 --precision bf16 --reference_fraction 0.02

The last line is `speedup <ratio>x max_abs_diff <value>`. With --reference_fraction < 1 the reference path
scores only that fraction of the queries of each direction; its time is extrapolated linearly (per query
cost is constant) and the difference is measured on those rows.
"""
from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from common import (Timer, add_common_args, build_model, peak_memory, random_images, random_texts,
                    reset_peak)

import evaluation
import utils


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument('--images', type=int, default=16)
    parser.add_argument('--texts', type=int, default=80)
    parser.add_argument('--k_test', type=int, default=16)
    parser.add_argument('--batch', type=int, default=256, help='pairs per forward in the fast path')
    parser.add_argument('--image_batch', type=int, default=64)
    parser.add_argument('--reference_fraction', type=float, default=1.0)
    parser.add_argument('--skip_reference', action='store_true')
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    autocast = utils.configure_precision(args.precision, device)
    model = build_model(args, queue_size=64).eval()

    images = random_images(args.images, args.image_size, 'cpu', args.seed)
    text_ids, text_mask = random_texts(args.texts, device, args.seed + 1)
    itm_ids = text_ids.clone()
    itm_ids[:, 0] = model.enc_token_id
    with torch.no_grad(), Timer(device) as t_feat:
        embeds, feats = [], []
        for i in range(0, args.images, args.image_batch):
            with evaluation._autocast(autocast):
                e, f = model.encode_image(images[i:i + args.image_batch].to(device))
            embeds.append(e)
            feats.append(f.float())
        image_embeds, image_feat = torch.cat(embeds), torch.cat(feats)
        with evaluation._autocast(autocast):
            text_feat = torch.cat([model.encode_text(text_ids[i:i + 256], text_mask[i:i + 256]).float()
                                   for i in range(0, args.texts, 256)])
    k = args.k_test
    entries = args.images * min(k, args.texts) + args.texts * min(k, args.images)
    inputs = (model, image_embeds, image_feat, text_feat, itm_ids, text_mask, k)
    print(f'setup: {args.vit} {args.image_size}px {args.precision} on {device} '
          f'({torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}), {args.images} images, '
          f'{args.texts} texts, k_test {k}: {entries} top-k entries; features {t_feat.seconds:.2f} s', flush=True)

    reset_peak(device)
    with Timer(device) as t_fast:
        fast_i2t, fast_t2i = evaluation.fast_scores(*inputs, pair_batch=args.batch, autocast=autocast,
                                                    log_every=10**9)
    print(f'fast:      wall {t_fast.seconds:8.2f} s  {entries / t_fast.seconds:10.1f} entries/s  '
          f'{peak_memory(device)}', flush=True)
    if args.skip_reference:
        return

    reset_peak(device)
    fraction = args.reference_fraction
    with Timer(device) as t_ref:
        ref_i2t, ref_t2i = evaluation.reference_scores(*inputs, autocast=autocast, log_every=10**9,
                                                       query_fraction=fraction)
    n_i, n_t = int(np.ceil(args.images * fraction)), int(np.ceil(args.texts * fraction))
    done = n_i * min(k, args.texts) + n_t * min(k, args.images)
    ref_seconds = t_ref.seconds * entries / done
    note = '' if fraction >= 1 else f' (extrapolated from {done} of {entries} entries)'
    print(f'reference: wall {ref_seconds:8.2f} s  {entries / ref_seconds:10.1f} entries/s  '
          f'{peak_memory(device)}{note}', flush=True)
    diff = max((fast_i2t[:n_i] - ref_i2t[:n_i]).abs().max().item(), (fast_t2i[:n_t] - ref_t2i[:n_t]).abs().max().item())
    print(f'speedup {ref_seconds / t_fast.seconds:.2f}x max_abs_diff {diff:.3g}', flush=True)


if __name__ == '__main__':
    main()

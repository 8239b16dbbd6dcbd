"""What the contrastive-only protocol (`k_test: 0`, itc) saves against the full one (`k_test` >= 1, itm).

Same process, same random-weight model, same inputs (random images, caption-like token ids): `evaluate_scores`, the
function training and --evaluate call, runs the whole evaluation of one split each way, features included (both
encode every image and text; itc then stops at the similarity, itm re-ranks each query's k_test best with the
matching head).

    python benchmarks/bench_protocol.py --vit base --images 16 --texts 80 --k_test 16 --device cpu
    python benchmarks/bench_protocol.py --images 1000 --texts 5000 --k_test 128 --precision bf16

The last line is `speedup <ratio>x max_abs_diff <value>`: the itm time over the itc time, and the largest
difference between the itc scores and the similarities the itm run ranked its candidates by (0: the itc protocol
scores exactly what the full one starts from).
"""
from __future__ import annotations

import argparse
import logging

import torch

from common import Timer, add_common_args, build_model, peak_memory, random_images, random_texts, reset_peak

import evaluation
import utils


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument('--images', type=int, default=16)
    parser.add_argument('--texts', type=int, default=80)
    parser.add_argument('--k_test', type=int, default=16, help='candidates re-ranked per query by the itm run (>= 1)')
    parser.add_argument('--image_batch', type=int, default=64)
    args = parser.parse_args()
    if args.k_test < 1:
        parser.error('--k_test is the itm run\'s: >= 1 (the itc run is k_test 0)')
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    autocast = utils.configure_precision(args.precision, device)
    model = build_model(args, queue_size=64).eval()

    images = random_images(args.images, args.image_size, 'cpu', args.seed)
    loader = [(images[i:i + args.image_batch], None) for i in range(0, args.images, args.image_batch)]
    text_ids, _ = random_texts(args.texts, 'cpu', args.seed + 1)
    # Captions as evaluation gets them (strings): the random ids decoded, [CLS]/[SEP]/padding dropped.
    texts = model.tokenizer.batch_decode(text_ids, skip_special_tokens=True)
    print(f'setup: {args.vit} {args.image_size}px {args.precision} on {device} '
          f'({torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}), {args.images} images, '
          f'{args.texts} texts; itm re-ranks k_test {args.k_test}', flush=True)

    results = {}
    for name, k_test in (('itc', 0), ('itm', args.k_test)):  # itc first: any warm-up cost falls on it
        reset_peak(device)
        config = {'k_test': k_test, 'eval_mode': 'fast', 'log_every': 10**9}
        with Timer(device) as timer:
            results[name] = evaluation.evaluate_scores(model, loader, texts, config, device, autocast,
                                                       with_similarity=True)
        print(f'{name} (k_test {k_test}): wall {timer.seconds:8.2f} s  {peak_memory(device)}', flush=True)
        results[name] += (timer.seconds,)
    itm_sims, itc_i2t, itc_t2i = results['itm'][2], results['itc'][0], results['itc'][1]
    diff = max(abs(itc_i2t - itm_sims).max(), abs(itc_t2i - itm_sims.T).max())
    print(f'speedup {results["itm"][3] / results["itc"][3]:.2f}x max_abs_diff {diff:.3g}', flush=True)


if __name__ == '__main__':
    main()

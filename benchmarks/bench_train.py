"""Fine-tuning step speed: the straightforward path vs the fast path, same process, same weights and inputs.

straightforward: fp32, full 35-token padding, three matching passes that each project the image tokens,
                 for-each AdamW (what the original ran, minus its process-group requirement).
fast:            padding trimmed, the three matching passes packed by image (each image's keys/values once, no
                 padding), fused AdamW on CUDA, the chosen --precision (bf16 autocast / tf32), optional --compile.

    python benchmarks/bench_train.py --vit base --batch 4 --steps 3 --device cpu
    python benchmarks/bench_train.py --vit base --batch 32 --precision bf16
    python benchmarks/bench_train.py --variants straightforward:fp32,straightforward:bf16,fast:fp32,fast:bf16 --profile
    python benchmarks/bench_train.py --batch 32 --accum_steps 4 [--negative_all_rank]

--accum_steps N adds an optimizer step of N micro-batches of --batch (train_retrieval's accum_steps: one process
playing N ranks) beside a step of one, on the fast path: seconds per optimizer step and peak memory of each.

The last line is `speedup <ratio>x max_abs_diff <value>`: the ratio of samples/s, and the largest difference
of (loss_ita, loss_itm) of one step in eval mode (dropout off) from the same weights, with --precision.

Before the last line, one `flops <path> <precision>:` line per run, per step: useful FLOPs (true caption lengths,
forward and backward, each image's keys/values once, no recomputation), executed FLOPs, achieved rate, plain
addmm's rate at the run's own shapes (measured in this process) and the ratio to the floor (the useful FLOPs at
the best of those rates in the same dtype; benchmarks/flops.py). `--lengths flickr`: caption lengths of real
Flickr30k captions instead of uniform over 8..35 tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Optional

import torch

from common import (Timer, add_common_args, build_model, count_host_syncs, peak_memory, profile_table,
                    random_captions, random_images, random_texts, reset_peak)
from flops import ExecutedFlops, lines, measure, training_step_flops

import utils


def run_steps(model, optimizer, batches, autocast, steps: int, warmup: int, device,
              counter: Optional[ExecutedFlops] = None) -> float:
    """Seconds per step over `steps` timed steps after `warmup` steps (their FLOPs into `counter`)."""
    model.train()
    seconds = 0.0
    for i in range(warmup + steps):
        images, ids, mask, idx = batches[i % len(batches)]
        counting = counter if counter is not None and i >= warmup else contextlib.nullcontext()
        with Timer(device) as timer, counting:
            with (autocast() if autocast else torch.autocast('cpu', enabled=False)):
                loss_ita, loss_itm = model(images, (ids, mask), 0.4, idx)
            optimizer.zero_grad(set_to_none=True)
            (loss_ita + loss_itm).backward()
            optimizer.step()
        if i >= warmup:
            seconds += timer.seconds
    return seconds / steps


def one_step_losses(model, batch, autocast) -> torch.Tensor:
    model.eval()
    images, ids, mask, idx = batch
    torch.manual_seed(0)
    with torch.no_grad(), (autocast() if autocast else torch.autocast('cpu', enabled=False)):
        return torch.stack(model(images, (ids, mask), 0.4, idx)).float()


def parse_variants(text: str, precision: str) -> list[tuple[str, str]]:
    """'straightforward:fp32,fast:bf16' -> [(path, precision), ...]; the default compares the two ends."""
    if not text:
        return [('straightforward', 'fp32'), ('fast', precision)]
    variants = []
    for item in text.split(','):
        path, _, prec = item.partition(':')
        if path not in ('straightforward', 'fast') or prec not in ('fp32', 'tf32', 'bf16'):
            raise SystemExit(f'--variants: {item!r} is not <straightforward|fast>:<fp32|tf32|bf16>')
        variants.append((path, prec))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--grad_ckpt_layers', type=int, default=0,
                        help='ViT blocks to checkpoint (the flickr config uses 4 for base)')
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--variants', default='',
                        help='comma-separated path:precision runs, e.g. straightforward:fp32,fast:fp32,fast:bf16 '
                             '(which change makes the difference); the speedup compares the first and the last')
    parser.add_argument('--profile', action='store_true', help='print the top operators of 2 steps of each run')
    parser.add_argument('--accum_steps', type=int, default=1,
                        help='also time an optimizer step of this many micro-batches of --batch beside one of 1')
    parser.add_argument('--negative_all_rank', action='store_true',
                        help='with --accum_steps: hard negatives from every micro-batch of the step (two passes)')
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    variants = parse_variants(args.variants, args.precision)

    model = build_model(args, queue_size=args.batch * 64, grad_ckpt=args.grad_ckpt_layers > 0,
                        ckpt_layer=args.grad_ckpt_layers)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    batches = []
    for i in range(2):
        ids, mask = random_texts(args.batch, device, args.seed + 10 + i, lengths=args.lengths)
        batches.append((random_images(args.batch, args.image_size, device, args.seed + i), ids, mask,
                        torch.randint(0, 10**6, (args.batch,), device=device)))
    print(f'setup: {args.vit} {args.image_size}px batch {args.batch} on {device} '
          f'({torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}), '
          f'{args.steps} timed steps after {args.warmup} warm-up', flush=True)

    # Useful work per timed step (the timed steps alternate between the batches).
    useful = sum(training_step_flops(model, batches[i % len(batches)][2].sum(dim=1).tolist())
                 for i in range(args.warmup, args.warmup + args.steps)) // args.steps
    results, flop_paths = [], []
    for path, precision in variants:
        model.load_state_dict(initial)
        fast = path == 'fast'
        model.fast_path = fast
        autocast = utils.configure_precision(precision, device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05, fused=fast and device.type == 'cuda')
        losses = one_step_losses(model, batches[0], autocast)
        model.load_state_dict(initial)
        if fast and args.compile:
            model.visual_encoder.compile()
            model.text_encoder.compile()
        reset_peak(device)
        # FLOPs counted in the timed steps on the CPU, in one more (untimed) step on a GPU where the hook's host time
        # per operator would count; none around compiled graphs.
        count = not (fast and args.compile)
        counter = ExecutedFlops() if count else None
        on_gpu = device.type == 'cuda'
        per_step = run_steps(model, optimizer, batches, autocast, args.steps, args.warmup, device,
                             None if on_gpu else counter)
        results.append((per_step, losses))
        if count:
            if on_gpu:
                run_steps(model, optimizer, batches, autocast, 1, 0, device, counter)
            matmul_dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
            flop_paths.append(measure(f'{path} {precision}', per_step, useful, counter, device, matmul_dtype,
                                      executed_scale=1 if on_gpu else 1 / args.steps))
        print(f'{path:15s} {precision}: {per_step:8.3f} s/step  {args.batch / per_step:8.2f} samples/s  '
              f'{peak_memory(device)}  losses {losses.tolist()}', flush=True)
        if args.profile:
            two_steps = lambda opt=optimizer: run_steps(model, opt, batches, autocast, 2, 0, device)
            print(profile_table(two_steps, device), flush=True)
            syncs = count_host_syncs(two_steps, device)  # the Timer's own synchronize adds 2 per step
            if syncs is not None:
                print(f'host syncs: {syncs} in 2 steps (4 of them the timer\'s)', flush=True)
        del optimizer
    if flop_paths:
        print(lines(flop_paths), flush=True)
    diff = (results[-1][1] - results[0][1]).abs().max().item()
    if args.accum_steps > 1:
        time_accumulation(model, initial, args, device)
    print(f'speedup {results[0][0] / results[-1][0]:.2f}x max_abs_diff {diff:.3g}', flush=True)


def time_accumulation(model, initial: dict, args, device) -> None:
    """Seconds per optimizer step and peak memory: accum_steps 1 and N, micro-batches of --batch (fast path)."""
    from run.checkpoints import RankStreams
    from run.training import accumulated_step, one_step
    model.load_state_dict(initial)
    model.fast_path, model.negative_all_rank = True, args.negative_all_rank
    model.train()
    autocast = utils.configure_precision(args.precision, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                  fused=device.type == 'cuda')
    micro = [(random_images(args.batch, args.image_size, device, args.seed + i),
              random_captions(model, args.batch, args.seed + 20 + i), torch.arange(args.batch) + i * args.batch)
             for i in range(args.accum_steps)]
    for n in (1, args.accum_steps):
        step = (lambda: one_step(model, model, micro[0], 0.4, autocast, device)) if n == 1 else \
            (lambda: accumulated_step(model, model, micro, 0.4, autocast, device,
                                      RankStreams.seeded(args.seed, range(n)), lambda: None))
        reset_peak(device)
        seconds = 0.0
        for i in range(args.warmup + args.steps):
            with Timer(device) as timer:
                optimizer.zero_grad(set_to_none=True)
                step()
                optimizer.step()
            seconds += timer.seconds if i >= args.warmup else 0.0
        per_step = seconds / args.steps
        print(f'accum_steps {n} (negative_all_rank {args.negative_all_rank}): {per_step:8.3f} s/optimizer step  '
              f'{per_step / n:8.3f} s/micro-batch  {peak_memory(device)}', flush=True)


if __name__ == '__main__':
    main()

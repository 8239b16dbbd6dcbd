"""FLOP accounting of the benchmarks: useful work, executed work, and the machine's matmul rate at the same shapes.

- **useful**: the matmul FLOPs the result needs, counted by formula from the inputs: true caption lengths, every
  distinct pair once, each image's cross-attention keys/values once, the text encoder's last layer for the first
  token only, no recomputation. Both paths of a benchmark have the same useful work.
- **executed**: the matmul FLOPs that actually ran (padding, repeated pairs, recomputation included), counted
  per operator while the path runs (`ExecutedFlops`, with `torch.utils.flop_counter`'s formulas; its dispatch
  hook costs microseconds per operator against milliseconds of work per operator here).
- **addmm rate**: plain `torch.addmm` timed at the path's own mm/addmm shapes, each weighted by how often the path
  ran it. **floor** = useful FLOPs at the best of the paths' addmm rates (same dtype): the time of the useful work
  at the machine's matmul speed.

Written by hand: torch.utils.flop_counter counts executed FLOPs but knows neither what is useful nor the shapes.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

aten = torch.ops.aten


@shape_wrapper
def _cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@shape_wrapper
def _cpu_flash_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# The CPU's fused attention kernels are missing from torch's registry (it counts them as 0).
FORMULAS = {**flop_registry,
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flop,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flop}
_MATRIX_OPS = {aten.mm: (0, 1), aten.addmm: (1, 2)}  # positions of the two matrices


class ExecutedFlops(TorchDispatchMode):
    """Matmul FLOPs of every operator run inside it, by operator, and the (M, K, N) shapes of mm/addmm."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()
        self.shapes: Counter = Counter()   # (M, K, N) -> calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        formula = FORMULAS.get(packet)
        if formula is not None:
            self.by_op[str(packet).replace('aten.', '')] += formula(*args, **kwargs, out_val=out)
            if packet in _MATRIX_OPS:
                a, b = (args[i] for i in _MATRIX_OPS[packet])
                self.shapes[(a.shape[0], a.shape[1], b.shape[1])] += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


def addmm_rate(shapes: Counter, device, dtype=torch.float32, coverage: float = 0.99, min_seconds: float = 0.05
               ) -> float:
    """FLOP/s of plain `torch.addmm` at `shapes` ((M, K, N) -> calls), each weighted by its calls.

    The shapes that make up `coverage` of the FLOPs are timed (median of at least 3 calls after a warm-up):
    rate = their FLOPs / their time.
    """
    flops = {s: 2 * s[0] * s[1] * s[2] * n for s, n in shapes.items()}
    total, covered, seconds = sum(flops.values()), 0, 0.0
    sync = torch.cuda.synchronize if torch.device(device).type == 'cuda' else (lambda: None)
    for shape in sorted(flops, key=flops.get, reverse=True):
        if covered >= coverage * total:
            break
        m, k, n = shape
        g = torch.Generator().manual_seed(0)
        a = torch.randn(m, k, generator=g).to(device, dtype)
        b = torch.randn(k, n, generator=g).to(device, dtype) / k ** 0.5
        bias = torch.randn(n, generator=g).to(device, dtype)
        times = []
        torch.addmm(bias, a, b)
        while len(times) < 3 or sum(times) < min_seconds:
            sync()
            start = time.perf_counter()
            torch.addmm(bias, a, b)
            sync()
            times.append(time.perf_counter() - start)
        covered += flops[shape]
        seconds += statistics.median(times) * shapes[shape]
    return covered / seconds if seconds else float('nan')


# ---------------------------------------------------------------------------------------------- useful work
@dataclass
class TextSizes:
    """The text encoder's sizes (BertConfig) and the image tokens its cross-attention reads."""
    hidden: int
    intermediate: int
    layers: int
    image_tokens: int
    image_width: int

    @classmethod
    def of(cls, model) -> 'TextSizes':
        config = model.text_encoder.config
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   model.visual_encoder.pos_embed.shape[1], config.encoder_width)


def text_encoder_flops(length: int, s: TextSizes, cross: bool, first_token_only_last: bool = True) -> int:
    """Forward matmul FLOPs of one caption of `length` tokens (cross: with the image, for matching).

    With `first_token_only_last`, the last layer computes keys/values of every token and the rest for the first.
    """
    h, n = s.hidden, s.image_tokens

    def layer(rows: int, keys: int) -> int:
        flops = 2 * keys * h * 2 * h + 2 * rows * h * h   # self-attention keys/values; queries
        flops += 4 * rows * keys * h + 2 * rows * h * h    # scores and weighted sum; output projection
        if cross:
            flops += 2 * rows * h * h + 4 * rows * n * h + 2 * rows * h * h  # queries, attention, output
        return flops + 4 * rows * h * s.intermediate          # feed-forward

    last_rows = 1 if first_token_only_last else length
    return (s.layers - 1) * layer(length, length) + layer(last_rows, length)


def image_kv_flops(s: TextSizes) -> int:
    """Cross-attention keys and values of one image's tokens, all layers."""
    return s.layers * 2 * (2 * s.image_tokens * s.image_width * s.hidden)


def matching_flops(lengths: Iterable[int], n_images: int, s: TextSizes) -> int:
    """Useful FLOPs of the matching head over pairs of these caption lengths and `n_images` images' keys/values."""
    head = 2 * s.hidden * 2
    return sum(text_encoder_flops(int(n), s, cross=True) + head for n in lengths) + n_images * image_kv_flops(s)


def patch_embedding_flops(vit) -> int:
    patch = vit.patch_embed
    kernel = patch.proj.kernel_size
    return 2 * patch.num_patches * patch.proj.in_channels * kernel[0] * kernel[1] * vit.embed_dim


def vit_forward_flops(vit) -> int:
    """Forward matmul FLOPs of one image through a timm ViT (patch embedding, every block)."""
    n, d = vit.pos_embed.shape[1], vit.embed_dim
    mlp = vit.blocks[0].mlp.fc1.out_features
    per_block = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * mlp
    return patch_embedding_flops(vit) + len(vit.blocks) * per_block


def training_step_flops(model, lengths: Sequence[int]) -> int:
    """Useful FLOPs of one fine-tuning step on a batch of captions of `lengths` tokens (one process).

    Forward and backward (twice the forward's matmuls; the patch embedding computes no gradient for the
    pixels) of the ViT, the text encoder and the matching passes (3 pairs per sample, each image's keys/values
    once); forward only of the momentum ViT and text encoder. No recomputation (activation checkpointing is
    executed work, not useful work); the small contrastive products are left out.
    """
    s = TextSizes.of(model)
    vit = vit_forward_flops(model.visual_encoder)
    vit_online = 3 * vit - patch_embedding_flops(model.visual_encoder)
    text = sum(text_encoder_flops(int(n), s, cross=False) for n in lengths)
    # Matching: each caption with its image and with a negative image, each image with a negative caption.
    matching = matching_flops(list(lengths) * 3, len(lengths), s)
    return len(lengths) * (vit_online + vit) + 3 * text + text + 3 * matching


@dataclass
class PathFlops:
    """What one benchmark path did, and how far from the floor."""
    name: str
    seconds: float
    useful: int
    executed: int
    rate: float         # addmm FLOP/s at the path's own mm/addmm shapes
    dtype: torch.dtype  # of its matmuls
    floor_rate: float = 0.0  # set by `lines`: the best addmm rate of the paths in this dtype

    @property
    def floor(self) -> float:
        return self.useful / self.floor_rate

    def line(self) -> str:
        extra = self.executed / self.useful - 1 if self.useful else float('nan')
        return (f'flops {self.name}: useful {self.useful / 1e12:.3f} TFLOP, executed {self.executed / 1e12:.3f} '
                f'TFLOP ({extra:+.1%}); achieved {self.executed / self.seconds / 1e9:.1f} GFLOP/s executed, '
                f'{self.useful / self.seconds / 1e9:.1f} useful; addmm at its shapes {self.rate / 1e9:.1f} GFLOP/s; '
                f'floor {self.floor:.2f} s; {self.seconds / self.floor:.2f}x the floor')


def measure(name: str, seconds: float, useful: int, counter: ExecutedFlops, device,
            dtype: torch.dtype = torch.float32, executed_scale: float = 1.0) -> PathFlops:
    """The path's FLOPs and the addmm rate at its shapes, measured now.

    `executed_scale`: the part of the work that ran, when `seconds` were extrapolated from it.
    """
    rate = addmm_rate(counter.shapes, device, dtype)
    return PathFlops(name, seconds, useful, round(counter.total * executed_scale), rate, dtype)


def lines(paths: Sequence[PathFlops]) -> str:
    """One line per path. The floor of the (common) useful work is at the best addmm rate that any path's shapes
    reached in the same dtype: a path cannot lower the bar by running small matmuls."""
    for path in paths:
        path.floor_rate = max(p.rate for p in paths if p.dtype == path.dtype)
    return '\n'.join(path.line() for path in paths)

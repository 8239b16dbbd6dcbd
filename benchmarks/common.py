"""Shared set-up of the benchmarks: a random-weight model of a real size and random inputs of real shapes."""
from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
import warnings

import torch

from flops import ExecutedFlops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from models import BLIP_Retrieval  # noqa: E402

TEXT_LENGTH = 35

# Caption lengths in tokens ([CLS] and [SEP] included) -> how many of 491 real Flickr30k captions have them: the
# first 240 captions of the Karpathy 1K test split (its first 48 images) and 251 consecutive ones from the middle
# of its 5,000 (from character 160,000 of data/f30k_precomp/test_caps.txt, the one-caption-a-line file of the
# VSE++/SCAN data; read in github.com/FlyCuteBird/MKTLON at 5597300), cleaned by data.captions.pre_caption
# (30 words) and tokenized with the bundled bert-base-uncased vocabulary: mean 14.7 tokens (12.2 words); 7 are
# cut at 35 tokens.
FLICKR_LENGTHS = {6: 2, 7: 8, 8: 25, 9: 35, 10: 44, 11: 41, 12: 42, 13: 50, 14: 44, 15: 36, 16: 28, 17: 18, 18: 27,
                  19: 16, 20: 15, 21: 9, 22: 2, 23: 9, 24: 8, 25: 2, 26: 1, 27: 3, 28: 5, 29: 3, 30: 5, 32: 5,
                  33: 1, 35: 7}
LENGTHS = ('uniform', 'flickr')


def add_common_args(parser) -> None:
    parser.add_argument('--vit', default='base', choices=['base', 'large'])
    parser.add_argument('--image_size', type=int, default=384)
    parser.add_argument('--precision', default='fp32', choices=['fp32', 'tf32', 'bf16'])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--tokenizer', default='bert-base-uncased', help='bundled by default: nothing is fetched')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--lengths', default='uniform', choices=LENGTHS,
                        help='caption lengths: uniform over 8..35 tokens, or drawn from real Flickr30k captions '
                             '(mean 14.7 tokens; see FLICKR_LENGTHS)')
    parser.add_argument('--no_cudnn_attention', action='store_true',
                        help="turn cuDNN attention off everywhere: the text encoder never uses it, this also moves "
                             "the ViT to PyTorch's other attention kernels")


def build_model(args, queue_size: int = 57600, grad_ckpt: bool = False, ckpt_layer: int = 0) -> BLIP_Retrieval:
    torch.backends.cudnn.benchmark = True  # as train_retrieval.py (and the original), for both paths
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # random init on the device: seconds instead of a minute on the CPU
        model = BLIP_Retrieval(med_config=os.path.join(REPO, 'configs', 'med_config.json'), image_size=args.image_size,
                               vit=args.vit, vit_grad_ckpt=grad_ckpt, vit_ckpt_layer=ckpt_layer,
                               queue_size=queue_size, tokenizer=args.tokenizer)
    return model


def random_images(n: int, size: int, device, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)


def caption_lengths(n: int, generator: torch.Generator, lengths: str = 'uniform') -> torch.Tensor:
    """`n` caption lengths in tokens: uniform over 8..35, or drawn from the Flickr30k histogram."""
    if lengths == 'uniform':
        return torch.randint(8, TEXT_LENGTH + 1, (n,), generator=generator)
    if lengths != 'flickr':
        raise ValueError(f'lengths must be one of {LENGTHS}, got {lengths!r}')
    values = torch.tensor(list(FLICKR_LENGTHS))
    counts = torch.tensor(list(FLICKR_LENGTHS.values()), dtype=torch.float)
    return values[torch.multinomial(counts, n, replacement=True, generator=generator)]


def random_texts(n: int, device, seed: int, vocab_size: int = 30522, lengths: str = 'uniform'
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the real shape (35, padded): [CLS] words [SEP] with caption-like lengths (`caption_lengths`)."""
    g = torch.Generator().manual_seed(seed)
    length = caption_lengths(n, g, lengths)
    ids = torch.randint(1000, vocab_size, (n, TEXT_LENGTH), generator=g)
    mask = (torch.arange(TEXT_LENGTH)[None, :] < length[:, None]).long()
    ids[:, 0] = 101
    ids[torch.arange(n), length - 1] = 102
    ids = ids * mask
    return ids.to(device), mask.to(device)


def random_captions(model, n: int, seed: int) -> list[str]:
    """Caption strings of the real token lengths (random_texts decoded), for code that tokenizes itself."""
    ids, mask = random_texts(n, 'cpu', seed, vocab_size=len(model.tokenizer))
    return [model.tokenizer.decode(row[1:int(length) - 1]) for row, length in zip(ids, mask.sum(dim=1))]


def synchronize(device) -> None:
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    if torch.device(device).type == 'cuda':
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device) -> str:
    if torch.device(device).type == 'cuda':
        return f'peak_mem {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB'
    return f'process_max_rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB'


class Timer:
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        synchronize(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start


def timed_and_counted(fn, device):
    """(fn()'s result, its seconds, its matmul FLOPs as a flops.ExecutedFlops).

    On the CPU the FLOPs are counted in the timed run (the hook costs microseconds per operator, the operators
    milliseconds); on a GPU, where the host's time per operator matters, in a second run, untimed.
    """
    counter = ExecutedFlops()
    on_gpu = torch.device(device).type == 'cuda'
    with Timer(device) as timer, (contextlib.nullcontext() if on_gpu else counter):
        result = fn()
    if on_gpu:
        with counter:
            fn()
    return result, timer.seconds, counter


def profile_table(fn, device, rows: int = 25) -> str:
    """The operators that took the most time while running `fn()` (device time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.device(device).type == 'cuda'
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        synchronize(device)
    averages = prof.key_averages()
    sort_by = 'self_cpu_time_total'
    if cuda:
        sort_by = 'self_device_time_total' if hasattr(averages[0], 'self_device_time_total') else 'self_cuda_time_total'
    return averages.table(sort_by=sort_by, row_limit=rows)


def count_host_syncs(fn, device) -> int | None:
    """How many times `fn()` made the host wait for the GPU (None off CUDA).

    Each wait empties the GPU's queue of launched kernels; a loop that waits once per batch keeps a fast GPU
    idle between its forwards. Counted with CUDA's sync debug mode, which warns at every synchronizing call.
    """
    if torch.device(device).type != 'cuda':
        return None
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode('default')
    return sum('synchroniz' in str(w.message) for w in caught)

"""The BLIP paper's numbers for an official checkpoint, shown beside a run's recall table.

Only the Flickr30k 1K test rows of README "Numbers to expect" (TR@1 and IR@1, from the paper); the paper's
R@5/R@10 and its COCO numbers are not repeated here because this repository does not quote them.
"""
from __future__ import annotations

import os
from typing import Optional
from urllib.parse import urlparse

from models.checkpoint import OFFICIAL_CHECKPOINTS

# checkpoint -> (what the paper's row is, TR@1, IR@1): evaluating a fine-tuned (or the COCO) checkpoint ...
_EVALUATED = {
    'model_base_retrieval_flickr': ('129M ViT-B, fine-tuned on Flickr', 97.3, 87.3),
    'model_large_retrieval_flickr': ('129M ViT-L, fine-tuned on Flickr', 97.4, 87.6),
    'model_base_retrieval_coco': ('129M ViT-B COCO model, zero-shot on Flickr', 96.0, 85.0),
}
# ... and fine-tuning on Flickr from a pre-trained one.
_FINE_TUNED_FROM = {
    'model_base_14M': ('14M ViT-B, fine-tuned on Flickr', 96.6, 87.2),
    'model_base': ('129M ViT-B, fine-tuned on Flickr', 97.3, 87.3),
    'model_base_capfilt_large': ('CapFilt-L 129M ViT-B, fine-tuned on Flickr', 97.2, 87.5),
    'model_large': ('129M ViT-L, fine-tuned on Flickr', 97.4, 87.6),
}


def official_name(pretrained: Optional[str]) -> Optional[str]:
    """'model_base_retrieval_flickr' for its URL or a local copy of the file, else None."""
    if not pretrained:
        return None
    name = os.path.basename(urlparse(pretrained).path if '://' in pretrained else pretrained)
    name = name[:-len('.pth')] if name.endswith('.pth') else name
    return name if name in OFFICIAL_CHECKPOINTS else None


def paper_numbers(pretrained: Optional[str], dataset: str, split: str, fine_tune: bool
                  ) -> Optional[tuple[str, dict[str, float]]]:
    """(row label, {'txt_r1': ..., 'img_r1': ...}) for the run, or None when the paper has no such row."""
    name = official_name(pretrained)
    if name is None or dataset != 'flickr' or split != 'test':
        return None
    row = (_FINE_TUNED_FROM if fine_tune else _EVALUATED).get(name)
    if row is None:
        return None
    label, tr1, ir1 = row
    return f'paper: {label}', {'txt_r1': tr1, 'img_r1': ir1}

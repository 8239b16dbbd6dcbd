"""Image transforms for BLIP retrieval: training augmentation and evaluation resizing.

Both pipelines work on PIL images (decode with PIL, resize the PIL image): decoding or resizing
on tensors gives slightly different pixels from the original BLIP preprocessing.
"""
from __future__ import annotations

import install_check  # noqa: F401 - first: a mismatched torch/torchvision stops here in one line
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from transform.randaugment import AUGMENT_OPS, MAX_LEVEL, RandomAugment

NORMALIZE_MEAN = (0.48145466, 0.4578275, 0.40821073)
NORMALIZE_STD = (0.26862954, 0.26130258, 0.27577711)

# The op set BLIP fine-tunes retrieval with (no colour, contrast, solarize or posterize ops).
TRAIN_AUGMENT_OPS = (
    "Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
)
TRAIN_MIN_CROP_SCALE = 0.5

__all__ = [
    "AUGMENT_OPS", "MAX_LEVEL", "NORMALIZE_MEAN", "NORMALIZE_STD", "RandomAugment", "TRAIN_AUGMENT_OPS",
    "build_eval_transform", "build_train_transform",
]


def build_train_transform(image_size: int) -> transforms.Compose:
    """Random resized crop, horizontal flip, RandAugment(2 ops, magnitude 5), tensor, normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(
            image_size, scale=(TRAIN_MIN_CROP_SCALE, 1.0), interpolation=InterpolationMode.BICUBIC
        ),
        transforms.RandomHorizontalFlip(),
        RandomAugment(2, 5, augs=TRAIN_AUGMENT_OPS),
        transforms.ToTensor(),
        transforms.Normalize(NORMALIZE_MEAN, NORMALIZE_STD),
    ])


def build_eval_transform(image_size: int) -> transforms.Compose:
    """Bicubic resize to ``image_size`` x ``image_size`` (aspect ratio not kept), tensor, normalisation."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(NORMALIZE_MEAN, NORMALIZE_STD),
    ])

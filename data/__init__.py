"""Retrieval data: annotations, caption cleaning, datasets and loaders.

Typical use (annotation download happens once, on rank 0, before the datasets are built)::

    if is_main_process():
        ensure_annotations(config['ann_root'], config['dataset'])
    barrier()
    datasets = create_datasets(config)
"""
from __future__ import annotations

from typing import Iterable

from torch.utils.data import Dataset

from transform import build_eval_transform, build_train_transform

from data.annotations import (
    ANNOTATION_URL_ROOT,
    DataError,
    annotation_file,
    annotation_url,
    ensure_annotations,
    load_annotation,
)
from data.captions import pre_caption
from data.loaders import (
    ResumableDistributedSampler,
    create_eval_loader,
    create_train_loader,
    set_loader_epoch,
    shard_range,
)
from data.retrieval_dataset import (
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    find_missing_images,
    resolve_image_path,
)

__all__ = [
    "ANNOTATION_URL_ROOT", "DataError", "ResumableDistributedSampler", "RetrievalEvalDataset",
    "RetrievalTrainDataset", "annotation_file", "annotation_url", "create_datasets", "create_eval_loader",
    "create_train_loader", "ensure_annotations", "find_missing_images", "load_annotation", "pre_caption",
    "resolve_image_path", "set_loader_epoch", "shard_range",
]

_REQUIRED_KEYS = ("image_root", "ann_root", "dataset", "image_size")


def create_datasets(config: dict, splits: Iterable[str] = ("train", "val", "test")) -> dict[str, Dataset]:
    """Build the retrieval datasets of ``splits`` from a config.

    Reads ``image_root``, ``ann_root``, ``dataset``, ``image_size`` and optionally ``max_words``
    (default 30) and ``seed`` (default 0). Annotation files must already exist: call
    :func:`ensure_annotations` first. 'train' gets the augmenting transform, other splits the
    evaluation transform.
    """
    missing_keys = [key for key in _REQUIRED_KEYS if key not in config]
    if missing_keys:
        raise KeyError(f"config is missing {missing_keys}, needed to build the datasets")
    image_root, ann_root, dataset = config["image_root"], config["ann_root"], config["dataset"]
    image_size = config["image_size"]
    max_words = config.get("max_words", 30)

    # `augment: False` trains on the evaluation transform (the synthetic demo's captions name positions,
    # which flips and crops would contradict).
    train_transform = (build_train_transform(image_size) if config.get("augment", True)
                       else build_eval_transform(image_size))
    datasets: dict[str, Dataset] = {}
    for split in splits:
        path = annotation_file(ann_root, dataset, split)
        records = load_annotation(path, split)
        if split == "train":
            datasets[split] = RetrievalTrainDataset(
                records, train_transform, image_root,
                max_words=max_words, seed=config.get("seed") or 0, name=path,
            )
        else:
            datasets[split] = RetrievalEvalDataset(
                records, build_eval_transform(image_size), image_root, max_words=max_words, name=path,
            )
    return datasets

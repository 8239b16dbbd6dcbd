"""Retrieval data: annotations, caption cleaning, datasets and loaders.

Typical use (downloads happen once, on rank 0, before the datasets are built)::

    utils.run_on_main(lambda: prepare_data(config, splits), DataError)
    datasets = create_datasets(config, splits)
    utils.run_on_main(lambda: check_images(datasets, config['image_root']), DataError)
"""
from __future__ import annotations

import os
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
    find_unreadable_images,
    resolve_image_path,
)

__all__ = [
    "ANNOTATION_URL_ROOT", "DataError", "ResumableDistributedSampler", "RetrievalEvalDataset",
    "RetrievalTrainDataset", "annotation_file", "annotation_url", "check_images", "create_datasets",
    "create_eval_loader", "create_train_loader", "ensure_annotations", "find_missing_images", "load_annotation",
    "pre_caption", "prepare_data", "resolve_image_path", "set_loader_epoch", "shard_range",
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
    if dataset == "demo":  # generated under image_root (data.demo), whatever ann_root says
        ann_root = os.path.join(image_root, "annotation")
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


def prepare_data(config: dict, splits: Iterable[str]) -> None:
    """Fetch what the splits need (annotation files, or the generated demo data) before any dataset is built.

    Call on one rank (see the module docstring).
    """
    if config["dataset"] == "demo":
        from data.demo import ensure_demo_data
        ensure_demo_data(config["image_root"])
    else:
        ensure_annotations(config["ann_root"], config["dataset"], tuple(splits))


def check_images(datasets: dict, image_root: str, shown_per_split: int = 20) -> None:
    """Every image of every split must exist and look like an image: all listed at once, not found on step 3,000.

    Cheap (a stat and a few bytes per file, see `find_unreadable_images`); decoding every image is left
    to `python -m data.prepare_flickr30k`.
    """
    problems = {split: find_unreadable_images(image_root, ds.image_paths()) for split, ds in datasets.items()}
    problems = {split: found for split, found in problems.items() if found}
    if not problems:
        return
    lines = []
    for split, found in problems.items():
        lines.append(f"  {split}: {len(found)} of {len(datasets[split].image_paths())} images")
        lines += [f"    {path}: {problem}" for path, problem in list(found.items())[:shown_per_split]]
        if len(found) > shown_per_split:
            lines.append(f"    ... and {len(found) - shown_per_split} more")
    raise DataError(f"images named by the annotations are missing or unreadable under image_root={image_root!r}:\n"
                    + "\n".join(lines) + '\nPoint image_root at the folder holding them (e.g. the Kaggle "Images" '
                    "folder's parent) and replace empty or broken files; `python -m data.prepare_flickr30k --root "
                    "DIR` checks and repairs a Flickr30k download.")

"""Retrieval annotation files: where they live, how to fetch them, and how to read them safely.

Annotation JSON files (the ones BLIP publishes) are lists of records:

* train: ``{"image": "flickr30k-images/1000092795.jpg", "caption": "...", "image_id": "1000092795"}``,
  one record per caption;
* val / test: ``{"image": "flickr30k-images/1007129816.jpg", "caption": ["...", "...", ...]}``,
  one record per image with all of its captions.

Downloading is kept out of the dataset constructors: call :func:`ensure_annotations` once, on
rank 0, before building datasets (the caller owns the barrier).
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import urllib.request
from typing import Any, Iterable

from atomic import atomic_file

_logger = logging.getLogger(__name__)

ANNOTATION_URL_ROOT = "https://storage.googleapis.com/sfr-vision-language-research/datasets/"

# Datasets whose annotation files BLIP publishes, mapped to their file-name prefix.
_PUBLISHED_PREFIXES = {"flickr": "flickr30k", "coco": "coco_karpathy"}

_DOWNLOAD_TIMEOUT_S = 60
_CHUNK_BYTES = 1 << 20

_TRAIN_FORMAT = 'a JSON list of {"image": "<path relative to image_root>", "caption": "<text>", "image_id": <id>}'
_EVAL_FORMAT = 'a JSON list of {"image": "<path relative to image_root>", "caption": ["<text>", ...]}'


class DataError(RuntimeError):
    """Input data (annotations or images) is missing or malformed; the message says how to fix it."""


def annotation_filename(dataset: str, split: str) -> str:
    """File name of the annotation for ``dataset`` and ``split`` (e.g. ``flickr30k_train.json``)."""
    prefix = _PUBLISHED_PREFIXES.get(dataset, dataset)
    return f"{prefix}_{split}.json"


def annotation_file(ann_root: str, dataset: str, split: str) -> str:
    """Full path of the annotation file for ``dataset`` and ``split`` under ``ann_root``."""
    return os.path.join(ann_root, annotation_filename(dataset, split))


def annotation_url(dataset: str, split: str) -> str | None:
    """Download URL of a published annotation file, or None for datasets BLIP does not publish."""
    if dataset not in _PUBLISHED_PREFIXES:
        return None
    return ANNOTATION_URL_ROOT + annotation_filename(dataset, split)


def expected_format(split: str) -> str:
    """Human-readable description of the record format of ``split``."""
    return _TRAIN_FORMAT if split == "train" else _EVAL_FORMAT


def _download_file(url: str, dest: str) -> None:
    """Download ``url`` to ``dest`` atomically (temp file in the same folder, then ``os.replace``)."""
    from tqdm import tqdm  # only needed when something is actually downloaded

    with atomic_file(dest) as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dest)) as progress:
            while chunk := response.read(_CHUNK_BYTES):
                out.write(chunk)
                progress.update(len(chunk))


def _missing_files_message(ann_root: str, dataset: str, missing: dict[str, str]) -> str:
    """Error text for annotation files that are absent and could not be fetched."""
    if dataset in _PUBLISHED_PREFIXES:
        lines = [f"  {path}\n    <- {annotation_url(dataset, split)}" for split, path in missing.items()]
        return (
            f"missing annotation files for dataset {dataset!r} (ann_root={ann_root!r}) could not be downloaded:\n"
            + "\n".join(lines)
            + f"\nDownload them on a machine with internet access and copy them into {ann_root}, "
            "or set `ann_root` in the config to a folder that already holds them."
        )
    lines = [f"  {path}  ({expected_format(split)})" for split, path in missing.items()]
    return (
        f"no annotation files for dataset {dataset!r}: there is no download URL for it, so these files must "
        f"already be in ann_root={ann_root!r}:\n" + "\n".join(lines)
        + f"\nExpected names are {dataset}_<split>.json; train records hold one caption each, "
        "val/test records hold a list of captions per image."
    )


def ensure_annotations(
    ann_root: str, dataset: str, splits: Iterable[str] = ("train", "val", "test")
) -> dict[str, str]:
    """Make sure the annotation files of ``splits`` exist under ``ann_root``, downloading missing ones.

    Call this once, on rank 0 only, before building datasets.

    Returns:
        ``{split: path}`` for every requested split.

    Raises:
        DataError: a file is missing and cannot be downloaded (no network, or an unknown dataset);
            the message lists each missing path with its URL.
    """
    paths = {split: annotation_file(ann_root, dataset, split) for split in splits}
    missing = {split: path for split, path in paths.items() if not os.path.isfile(path)}
    if not missing:
        return paths
    if dataset not in _PUBLISHED_PREFIXES:
        raise DataError(_missing_files_message(ann_root, dataset, missing))

    os.makedirs(ann_root, exist_ok=True)
    failed: dict[str, str] = {}
    for split, path in missing.items():
        url = annotation_url(dataset, split)
        _logger.info("downloading %s -> %s", url, path)
        try:
            _download_file(url, path)
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError, HTTPError, timeouts: OSError
            _logger.warning("download of %s failed: %s", url, exc)
            failed[split] = path
    if failed:
        raise DataError(_missing_files_message(ann_root, dataset, failed))
    return paths


def _check_record(record: Any, split: str) -> str | None:
    """Problem with one annotation record, or None when it is valid."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not an object"
    if not isinstance(record.get("image"), str) or not record["image"]:
        return "field 'image' is missing or not a non-empty string"
    caption = record.get("caption")
    if split == "train":
        if not isinstance(caption, str):
            return "field 'caption' is missing or not a string"
        if "image_id" not in record:
            return "field 'image_id' is missing"
        return None
    if not isinstance(caption, list) or not caption:
        return "field 'caption' is missing or not a non-empty list of strings"
    if not all(isinstance(text, str) for text in caption):
        return "field 'caption' holds a non-string entry (must be a list of strings)"
    return None


def load_annotation(path: str, split: str) -> list[dict]:
    """Read and validate an annotation file of ``split`` ('train', 'val' or 'test').

    Raises:
        DataError: the file is missing, is not valid JSON, or a record lacks a required field;
            the message names the file, the record index and the expected format.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            records = json.load(handle)
    except FileNotFoundError:
        raise DataError(
            f"annotation file {path} does not exist; call data.annotations.ensure_annotations() first "
            "(it downloads the published files) or set `ann_root` to the folder that holds it"
        ) from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"annotation file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "delete it and download it again"
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"annotation file {path} is not UTF-8 text ({exc}); delete it and download it again") from None

    if not isinstance(records, list) or not records:
        kind = "an empty list" if isinstance(records, list) else f"a JSON {type(records).__name__}"
        raise DataError(f"annotation file {path} is {kind}; expected {expected_format(split)}")
    for index, record in enumerate(records):
        problem = _check_record(record, split)
        if problem is not None:
            raise DataError(
                f"annotation file {path}, record {index}: {problem}; {split} files must be {expected_format(split)}"
            )
    return records

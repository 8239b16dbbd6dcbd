"""Image-text retrieval datasets (Flickr30k, COCO) built from validated annotation records."""
from __future__ import annotations

import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data.annotations import DataError
from data.captions import pre_caption

_logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]
RETRY_DELAY_S = 1.0  # before the one retry of an image that cannot be read (a network file system's hiccup)


def _candidate_paths(image_root: str, relative: str) -> list[str]:
    """Where an annotation's image may live, in order of preference.

    The annotation's own relative path comes first (e.g. ``flickr30k-images/1000092795.jpg``); the
    others cover the layouts that common downloads of Flickr30k unpack to (Kaggle's ``Images/``
    and ``flickr30k_images/flickr30k_images/``) and a flat folder.
    """
    name = os.path.basename(relative)
    return [
        os.path.join(image_root, relative),
        os.path.join(image_root, "Images", name),
        os.path.join(image_root, "flickr30k_images", "flickr30k_images", name),
        os.path.join(image_root, "flickr30k_images", name),
        os.path.join(image_root, name),
    ]


class ImagePathResolver:
    """Resolves annotation image paths under ``image_root``, remembering which layout worked.

    Once one image is found with layout k, layout k is tried first for the next ones, so a whole
    dataset in a non-default layout costs one file-system check per image.
    """

    def __init__(self, image_root: str) -> None:
        self.image_root = image_root
        self._layout: int | None = None

    def resolve(self, relative: str) -> str | None:
        """Existing file for ``relative``, or None when no layout has it."""
        candidates = _candidate_paths(self.image_root, relative)
        if self._layout is not None and os.path.isfile(candidates[self._layout]):
            return candidates[self._layout]
        for layout, path in enumerate(candidates):
            if os.path.isfile(path):
                self._layout = layout
                return path
        return None


def resolve_image_path(image_root: str, relative: str) -> str | None:
    """First existing file among the supported layouts for ``relative``, or None (no caching)."""
    return ImagePathResolver(image_root).resolve(relative)


def _open_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def load_image(resolver: ImagePathResolver, relative: str, retries: int = 1) -> Image.Image:
    """Open the image of annotation path ``relative`` as RGB, trying once more after a failure.

    Every image was checked before training started, so a failure here is a file that changed since, or a
    network file system's hiccup: worth one retry. A sample is never replaced by another one (the data order
    is what exact resume relies on).

    Raises:
        DataError: the file is missing or cannot be decoded, also on the retry; the message names it.
    """
    for attempt in range(retries + 1):
        path = resolver.resolve(relative)
        try:
            if path is None:
                tried = "\n  ".join(_candidate_paths(resolver.image_root, relative))
                raise DataError(f"image {relative!r} not found under image_root={resolver.image_root!r}; tried:\n"
                                f"  {tried}\nSet `image_root` to the folder holding the dataset's images.")
            try:
                return _open_rgb(path)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise DataError(f"cannot read image {path} (annotation entry {relative!r}): {exc}; "
                                "the file is corrupt or truncated, replace it") from None
        except DataError as error:
            if attempt == retries:
                raise
            _logger.warning("%s; trying again in %.0f s", str(error).splitlines()[0], RETRY_DELAY_S)
            time.sleep(RETRY_DELAY_S)
    raise AssertionError("unreachable")


def find_missing_images(image_root: str, image_relpaths: Iterable[str], check_open: bool = False) -> list[str]:
    """Annotation image paths that cannot be found under ``image_root`` (or, with ``check_open``, decoded).

    ``check_open`` runs PIL's ``verify()`` on each file, which reads headers and structure but is
    much cheaper than full decoding.
    """
    resolver = ImagePathResolver(image_root)
    missing = []
    for relative in image_relpaths:
        path = resolver.resolve(relative)
        if path is None:
            missing.append(relative)
            continue
        if check_open:
            try:
                with Image.open(path) as img:
                    img.verify()
            except Exception:  # PIL raises many types for broken files; any of them means unusable
                missing.append(relative)
    return missing


# Leading bytes of the image formats datasets ship in; anything else gets a (cheap) header parse.
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def image_file_problem(path: str) -> str | None:
    """Why the file at ``path`` cannot be an image (empty, unreadable, not an image format), or None.

    Reads a few bytes only: a stat and the file signature, plus a header parse (no decoding) for
    formats not in the fast list. Corrupt pixel data is left to the full check of the prepare command.
    """
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if head.startswith(_IMAGE_SIGNATURES) or (head.startswith(b"RIFF") and head[8:12] == b"WEBP"):
        return None
    try:
        with Image.open(path):  # identifies the format from the header; pixels are not decoded
            return None
    except Exception:  # PIL raises many types for non-images; any of them means unusable
        return f"not an image file (starts with {head[:8]!r})"


def find_unreadable_images(image_root: str, image_relpaths: Iterable[str], threads: int = 16) -> dict[str, str]:
    """``{annotation image path: problem}`` for images that are missing, empty or not an image file.

    Cheap enough for every image of a dataset before training (see :func:`image_file_problem`);
    the files are checked from a few threads because network file systems reward parallel reads.
    """
    resolver = ImagePathResolver(image_root)
    located = [(relative, resolver.resolve(relative)) for relative in image_relpaths]

    def problem_of(item: tuple[str, str | None]) -> str | None:
        return "missing" if item[1] is None else image_file_problem(item[1])

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        problems = list(pool.map(problem_of, located))
    return {relative: problem for (relative, _), problem in zip(located, problems) if problem is not None}


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """64-bit seed that depends only on (seed, epoch, index), well mixed by numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def run_seeded(fn: Callable[[], object], seed: int) -> object:
    """Call ``fn`` with torch, ``random`` and ``np.random`` seeded from ``seed``, then restore all three.

    The caller's global generators are left exactly as they were, so data loading in the main
    process does not shift the training RNG stream.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return fn()
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class RetrievalTrainDataset(Dataset):
    """One item per caption: ``(image_tensor, cleaned_caption, image_index)``.

    ``image_index`` remaps the annotation ``image_id`` to 0..N-1 in order of first appearance;
    captions sharing it are positives of each other in the contrastive loss.

    Augmentation randomness is a function of (seed, epoch, index) only, so a batch is identical
    whatever the number of workers or their scheduling; call :meth:`set_epoch` every epoch.
    """

    def __init__(
        self,
        annotation: Sequence[dict],
        transform: Transform,
        image_root: str,
        max_words: int = 30,
        seed: int = 0,
        name: str = "training set",
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.annotation = list(annotation)
        self.transform = transform
        self.image_root = image_root
        self.max_words = max_words
        self.seed = seed
        self.name = name
        self.epoch = 0
        self.img_ids: dict[object, int] = {}
        for record in self.annotation:
            self.img_ids.setdefault(record["image_id"], len(self.img_ids))
        self._resolver = ImagePathResolver(image_root)

    def __len__(self) -> int:
        return len(self.annotation)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch``."""
        self.epoch = epoch

    def image_paths(self) -> list[str]:
        """Distinct annotation image paths, in order of first appearance."""
        return list(dict.fromkeys(record["image"] for record in self.annotation))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int]:
        record = self.annotation[index]
        image = load_image(self._resolver, record["image"])
        tensor = run_seeded(lambda: self.transform(image), sample_seed(self.seed, self.epoch, index))
        caption = pre_caption(record["caption"], self.max_words)
        return tensor, caption, self.img_ids[record["image_id"]]


class RetrievalEvalDataset(Dataset):
    """One item per image: ``(image_tensor, image_index)``; all captions are in :attr:`text`.

    Attributes:
        text: cleaned captions, image by image in annotation order.
        image: the annotation's ``image`` field of each image.
        txt2img: caption index -> image index.
        img2txt: image index -> its caption indices.
    """

    def __init__(
        self,
        annotation: Sequence[dict],
        transform: Transform,
        image_root: str,
        max_words: int = 30,
        name: str = "evaluation set",
    ) -> None:
        self.annotation = list(annotation)
        self.transform = transform
        self.image_root = image_root
        self.name = name
        self.text: list[str] = []
        self.image: list[str] = []
        self.txt2img: dict[int, int] = {}
        self.img2txt: dict[int, list[int]] = {}
        for img_index, record in enumerate(self.annotation):
            self.image.append(record["image"])
            self.img2txt[img_index] = []
            for caption in record["caption"]:
                txt_index = len(self.text)
                self.text.append(pre_caption(caption, max_words))
                self.img2txt[img_index].append(txt_index)
                self.txt2img[txt_index] = img_index
        self._resolver = ImagePathResolver(image_root)

    def __len__(self) -> int:
        return len(self.annotation)

    def image_paths(self) -> list[str]:
        """Annotation image paths, one per item."""
        return list(self.image)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_image(self._resolver, self.image[index])
        return self.transform(image), index

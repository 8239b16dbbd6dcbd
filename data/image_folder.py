"""Image files: a folder of the user's own images (recursive) for `search.py` (listing with size and mtime, and
loading), and the full-decode check of one image that the data preparation commands run on every file."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp')


@dataclass(frozen=True)
class FileStamp:
    """What tells a changed file from an unchanged one without reading it."""
    size: int
    mtime_ns: int


def scan_images(folder: str) -> dict[str, FileStamp]:
    """`relative path (with /): stamp` of every JPEG/PNG/WebP file under `folder`, sorted by path.

    Hidden folders and files (a leading '.') are skipped; symlinked folders are not followed (no cycles).
    """
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for name in files:
            if name.startswith('.') or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(root, name)
            try:
                stat = os.stat(path)
            except OSError:  # vanished or a broken link: the loader reports it as unreadable
                stat = None
            relative = os.path.relpath(path, folder).replace(os.sep, '/')
            found[relative] = FileStamp(stat.st_size, stat.st_mtime_ns) if stat else FileStamp(-1, -1)
    return dict(sorted(found.items()))


def open_rgb(path: str) -> Image.Image:
    """The image fully decoded as RGB (a truncated or corrupt file raises here, not later)."""
    with Image.open(path) as image:
        return image.convert('RGB')


class ImageFileDataset(Dataset):
    """`(image tensor, position, problem)` per file: an unreadable file gives a zero tensor and its problem."""

    def __init__(self, folder: str, relative_paths: list[str], transform: Callable, image_size: int) -> None:
        self.folder = folder
        self.relative_paths = list(relative_paths)
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.relative_paths)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, str]:
        path = os.path.join(self.folder, self.relative_paths[position])
        try:
            return self.transform(open_rgb(path)), position, ''
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            return torch.zeros(3, self.image_size, self.image_size), position, str(error) or type(error).__name__


def decode_problem(path: str | os.PathLike[str]) -> str | None:
    """Return None when ``path`` decodes fully, else why not."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))  # JPEG: decode at reduced scale; still reads every byte
            image.load()
    except FileNotFoundError:
        return "missing"
    except Exception as exc:  # PIL raises many types for bad data
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None

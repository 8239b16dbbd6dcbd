"""Small JPEG thumbnails of the images a page shows, made with PIL (decoded with PIL, resized with PIL)."""
from __future__ import annotations

import io
import logging
import os
from typing import Mapping, Optional

from PIL import Image

_logger = logging.getLogger(__name__)

THUMB_DIR = 'thumbs'
JPEG_QUALITY = 85


def thumbnail_jpeg(path: str, max_side: int) -> Optional[bytes]:
    """JPEG bytes of `path` shrunk to at most `max_side` pixels a side, or None when it cannot be read."""
    try:
        with Image.open(path) as image:
            # JPEG: let the decoder scale by 1/2..1/8 while decoding, far cheaper than a full decode.
            image.draft('RGB', (max_side, max_side))
            image = image.convert('RGB')
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        _logger.warning('No thumbnail for %s: %s', path, error)
        return None
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=JPEG_QUALITY)
    return buffer.getvalue()


def write_thumbnails(sources: Mapping[str, Optional[str]], folder: str, max_side: int, subdir: str = THUMB_DIR
                     ) -> dict[str, str]:
    """Write `folder/subdir/<name>` for every `name: image path`; returns `name: relative src` of those written.

    Each image is decoded once however often the page shows it. A source that is None or unreadable gets
    no entry (the page shows a placeholder instead of a broken image).
    """
    os.makedirs(os.path.join(folder, subdir), exist_ok=True)
    written = {}
    for name, source in sorted(sources.items()):
        data = thumbnail_jpeg(source, max_side) if source else None
        if data is None:
            continue
        with open(os.path.join(folder, subdir, name), 'wb') as f:
            f.write(data)
        written[name] = f'{subdir}/{name}'
    return written

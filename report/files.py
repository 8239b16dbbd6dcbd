"""Deterministic files for the report: the same inputs give the same bytes on any run."""
from __future__ import annotations

import io
import zipfile
from typing import Mapping

import numpy as np

# A fixed member date: np.savez stamps each member with the current time, so two identical runs would
# differ in their bytes (and a 1-process and a 2-process report would not compare equal).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An .npz archive (readable by `np.load(allow_pickle=False)`) whose bytes depend only on `arrays`.

    Written with zipfile by hand only to fix the member dates (see `_ZIP_DATE`); the members are the
    `.npy` files numpy itself writes.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w', compression=zipfile.ZIP_DEFLATED) as archive:
        for name, value in arrays.items():
            member = zipfile.ZipInfo(f'{name}.npy', date_time=_ZIP_DATE)
            member.compress_type = zipfile.ZIP_DEFLATED
            member.external_attr = 0o644 << 16
            array_bytes = io.BytesIO()
            np.lib.format.write_array(array_bytes, np.asanyarray(value), allow_pickle=False)
            archive.writestr(member, array_bytes.getvalue())
    return buffer.getvalue()

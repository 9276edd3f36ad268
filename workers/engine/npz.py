"""``.npz`` archives (what ``numpy.load`` reads) written the same way every time, and fast.

``numpy.savez_compressed`` stamps each entry with the current time, so the same arrays gave
different bytes on every run, and deflates at zlib's level 6: 37 ms for an EfficientNet
explanation, most of it on the float32 image, which deflate barely shrinks. Here each array is an
``.npy`` entry (``numpy.lib.format``), raw-deflated by ISA-L at its level 1 where the ``isal``
package is installed (a dependency of the engine; else zlib at level 1), in a zip archive whose
every header field is fixed (entries dated 1980-01-01, as zip's epoch, in the order given): the
same arrays give the same bytes, in 1-2 ms for that explanation, about as small.

The hand-written archive is plain (32-bit) zip, whose sizes and offsets stop at 4 GiB; an archive
that may pass it is written by :mod:`zipfile` with Zip64 records, the same fixed dates and zlib's
level 1 (slower, as deterministic).
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from typing import Mapping

import numpy as np

from .images import npy_bytes


def _zlib_raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(1, zlib.DEFLATED, -15)  # wbits -15: a raw deflate stream, as zip entries hold
    return compressor.compress(data) + compressor.flush()


try:
    from isal.isal_zlib import compress as _isal_compress
    from isal.isal_zlib import crc32 as _crc32  # the same checksum, a tenth of zlib's time

    def _raw_deflate(data: bytes) -> bytes:
        return _isal_compress(data, 1, -15)
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives valid streams all the same
    _raw_deflate, _crc32 = _zlib_raw_deflate, zlib.crc32

_DOS_DATE = (1 << 5) | 1  # 1980-01-01: (year - 1980) << 9 | month << 5 | day
_DOS_TIME = 0
_VERSION = 20  # "version needed to extract" for deflate
_DEFLATED = 8

#: An archive whose entries could pass this many bytes is written with Zip64 records instead.
ZIP32_LIMIT = 0xFFFF_FFFF - (1 << 20)


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """``arrays`` as an ``.npz`` archive, entry ``<name>.npy`` for each, in the mapping's order.
    Object arrays are refused (``ValueError``), as ``numpy.load(allow_pickle=False)`` would."""
    entries = [(f"{name}.npy".encode("ascii"), npy_bytes(array)) for name, array in arrays.items()]
    if sum(len(data) for _, data in entries) + 1024 * len(entries) > ZIP32_LIMIT:
        return _zip64_archive(entries)
    out, directory = [], []
    offset = 0
    for name, data in entries:
        packed = _raw_deflate(data)
        crc = _crc32(data)
        fields = (_VERSION, 0, _DEFLATED, _DOS_TIME, _DOS_DATE, crc, len(packed), len(data), len(name))
        local = struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields, 0) + name
        directory.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, _VERSION, *fields, 0, 0, 0, 0, 0, offset) + name)
        out += [local, packed]
        offset += len(local) + len(packed)
    central = b"".join(directory)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), offset, 0)
    return b"".join(out) + central + end


def _zip64_archive(entries: list[tuple[bytes, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", allowZip64=True) as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name.decode("ascii"), date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 0  # else the platform's
            archive.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)  # Zip64 past 4 GiB
    return buffer.getvalue()

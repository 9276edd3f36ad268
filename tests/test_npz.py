"""The npz writer against numpy's reader and zip's own checks: every dtype an explanation stores
round-trips, the bytes are the same for the same arrays, and the Zip64 and zlib paths are as valid."""

import io
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from shapfleet.workers.engine import npz


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"values": rng.normal(size=(49, 3)), "image": rng.uniform(0, 255, (32, 24, 3)).astype(np.float32),
            "segments": rng.integers(0, 49, (32, 24)).astype(np.int32), "exact": np.bool_(True),
            "seed": np.int64(-3), "class_names": np.array(["tabby", "tiger cat", "ü"], dtype=str),
            "settings": np.array('{"nsamples": 1000}'), "empty": np.zeros((0, 4))}


def _check_archive(data: bytes, arrays: dict[str, np.ndarray]) -> None:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None  # every entry's CRC-32 checks
        assert [info.filename for info in archive.infolist()] == [f"{name}.npy" for name in arrays]
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        for name, array in arrays.items():
            assert loaded[name].dtype == array.dtype and np.array_equal(loaded[name], array), name


def test_every_dtype_round_trips_and_the_same_arrays_give_the_same_bytes():
    arrays = _arrays()
    data = npz.npz_bytes(arrays)
    _check_archive(data, arrays)
    assert npz.npz_bytes(_arrays()) == data
    # The same bytes in another process (nothing depends on the clock or on this process's state).
    script = "import sys; sys.path.insert(0, 'tests'); from test_npz import _arrays; from shapfleet.workers.engine import npz; " \
             "sys.stdout.buffer.write(npz.npz_bytes(_arrays()))"
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, check=True).stdout == data


def test_archives_that_may_pass_4_gib_are_written_with_zip64_records(monkeypatch):
    arrays = _arrays()
    monkeypatch.setattr(npz, "ZIP32_LIMIT", 0)  # this archive takes the Zip64 path
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1000)  # where zipfile writes Zip64 records for entries past 1000 bytes
    data = npz.npz_bytes(arrays)
    _check_archive(data, arrays)
    assert b"PK\x06\x06" in data  # the Zip64 end of central directory record
    assert npz.npz_bytes(_arrays()) == data


def test_the_zlib_fallback_writes_an_equally_valid_archive(monkeypatch):
    monkeypatch.setattr(npz, "_raw_deflate", npz._zlib_raw_deflate)
    _check_archive(npz.npz_bytes(_arrays()), _arrays())


def test_object_arrays_are_refused():
    with pytest.raises(ValueError):
        npz.npz_bytes({"x": np.array([{"a": 1}], dtype=object)})

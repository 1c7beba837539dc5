from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from datafiles import idx_bytes, write_idx

from bbdrop.data import parse_idx, read_idx


@pytest.mark.parametrize("gz", [True, False])
def test_uint8_images_round_trip_exactly(tmp_path: Path, gz: bool) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / "images", images, gz)
    out = read_idx(path, dtype=np.uint8, shape=(None, 28, 28))
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), images)


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "float32", "float64"])
def test_multibyte_dtypes_are_decoded_big_endian(tmp_path: Path, dtype: str) -> None:
    values = (np.arange(-6, 6).reshape(3, 4) * 1000).astype(dtype)
    if dtype == "int8":
        values = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    out = read_idx(write_idx(tmp_path / "v.idx", values, gz=False))
    assert out.dtype == getattr(torch, dtype)
    np.testing.assert_array_equal(out.numpy(), values)


def test_compression_is_detected_by_content_not_name(tmp_path: Path) -> None:
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    raw_named_gz = tmp_path / "labels.gz"
    raw_named_gz.write_bytes(idx_bytes(labels))
    gz_named_raw = tmp_path / "labels"
    gz_named_raw.write_bytes(gzip.compress(idx_bytes(labels)))
    for path in (raw_named_gz, gz_named_raw):
        np.testing.assert_array_equal(read_idx(path).numpy(), labels)


def _good() -> bytes:
    return idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8))


CORRUPT = {
    "bad magic": (b"\x01\x00" + _good()[2:], "bad IDX magic"),
    "too short": (b"\x00\x00", "too short"),
    "unknown dtype": (b"\x00\x00\x07\x03" + _good()[4:], "unknown IDX dtype code 0x07"),
    "rank zero": (b"\x00\x00\x08\x00", "rank is 0"),
    "truncated header": (_good()[:9], "truncated header"),
    "truncated data": (_good()[:-1], "truncated"),
    "trailing bytes": (_good() + b"\x00", "trailing bytes"),
    "sizes disagree with length": (
        _good()[:4] + (3).to_bytes(4, "big") + _good()[8:],
        "truncated: header says sizes (3, 3, 3)",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPT))
@pytest.mark.parametrize("gz", [True, False])
def test_corrupt_files_raise_value_error_naming_file_and_problem(
    tmp_path: Path, case: str, gz: bool
) -> None:
    blob, message = CORRUPT[case]
    path = tmp_path / f"broken-{case.replace(' ', '-')}"
    path.write_bytes(gzip.compress(blob) if gz else blob)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_stream_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(_good())[:-12])
    with pytest.raises(ValueError, match="corrupt gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_expected_dtype_and_shape_are_enforced() -> None:
    blob = idx_bytes(np.zeros((2, 4, 4), dtype=np.uint8))
    assert parse_idx(blob, shape=(None, 4, 4)).shape == (2, 4, 4)
    with pytest.raises(
        ValueError, match=r"src: IDX sizes \(2, 4, 4\) \(rank 3\), expected \(\*, 28, 28\)"
    ):
        parse_idx(blob, "src", shape=(None, 28, 28))
    with pytest.raises(ValueError, match=r"\(rank 3\), expected \(\*\)"):
        parse_idx(blob, "src", shape=(None,))
    with pytest.raises(ValueError, match=r"0x08 \(uint8\), expected float32"):
        parse_idx(blob, "src", dtype=np.float32)

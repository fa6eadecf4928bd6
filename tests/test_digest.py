"""common.digest: manifests that prove a folder's bytes."""

import numpy as np
import pytest

from common.digest import IntegrityError, digest_bytes, digest_file, hashing_writer, read_manifest, verify_manifest, write_manifest


def test_hashing_while_writing_equals_hashing_the_file(tmp_path):
    with hashing_writer(tmp_path / "a.npy") as f:
        np.save(f, np.arange(1000, dtype=np.float32))
    assert f.digest == digest_file(tmp_path / "a.npy") == digest_bytes((tmp_path / "a.npy").read_bytes())


def test_a_flipped_byte_a_truncation_and_a_missing_file_are_each_named(tmp_path):
    for name in ("a.bin", "b.bin"):
        (tmp_path / name).write_bytes(bytes(range(256)) * 64)
    write_manifest(tmp_path, {n: digest_file(tmp_path / n) for n in ("a.bin", "b.bin")})
    assert verify_manifest(tmp_path, "thing")
    data = bytearray((tmp_path / "a.bin").read_bytes())
    data[100] ^= 0x01
    (tmp_path / "a.bin").write_bytes(data)
    with pytest.raises(IntegrityError, match=r"thing: .*a\.bin is damaged"):
        verify_manifest(tmp_path, "thing")
    assert verify_manifest(tmp_path, "thing", names=["b.bin"])  # only what was asked for
    (tmp_path / "b.bin").write_bytes((tmp_path / "b.bin").read_bytes()[:-1])
    with pytest.raises(IntegrityError, match=r"b\.bin is damaged"):
        verify_manifest(tmp_path, "thing", names=["b.bin"])
    (tmp_path / "b.bin").unlink()
    with pytest.raises(IntegrityError, match=r"b\.bin is missing"):
        verify_manifest(tmp_path, "thing", names=["b.bin"])


def test_no_manifest_is_tolerated_unless_required_and_a_damaged_one_is_refused(tmp_path):
    assert verify_manifest(tmp_path, "old") is False
    with pytest.raises(IntegrityError, match="no MANIFEST.json"):
        verify_manifest(tmp_path, "old", required=True)
    (tmp_path / "MANIFEST.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="manifest .* is damaged"):
        read_manifest(tmp_path, "thing")

"""The shared SHA-256 helpers (``mlflow_fullmodel._hashing``): a tensor hashes as its dtype, shape
and bytes, and RandomCrops' crop positions, drawn from that hash, stay what saved models expect."""

from __future__ import annotations

import hashlib

import pytest
import torch

from mlflow_fullmodel._hashing import hash_tensor, read_verified
from mlflow_fullmodel.exceptions import IntegrityError
from mlflow_fullmodel.transforms import RandomCrops


def hexdigest(tensor: torch.Tensor) -> str:
    digest = hashlib.sha256()
    hash_tensor(digest, tensor)
    return digest.hexdigest()


def test_a_tensor_hashes_as_its_dtype_shape_and_bytes():
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    spelled_out = hashlib.sha256(str((torch.float32, (2, 3))).encode())
    spelled_out.update(tensor.numpy().tobytes())
    assert hexdigest(tensor) == spelled_out.hexdigest()
    assert hexdigest(tensor.t()) == hexdigest(tensor.t().contiguous())  # the values, not the strides
    assert len({hexdigest(tensor), hexdigest(tensor.double()), hexdigest(tensor.reshape(3, 2))}) == 3


def test_random_crops_are_placed_by_the_seed_the_tensor_hash_and_the_index():
    image = torch.arange(3 * 9 * 11, dtype=torch.float32).reshape(3, 9, 11)
    content = hashlib.sha256(str((image.dtype, tuple(image.shape))).encode())
    content.update(image.numpy().tobytes())
    key = b"7:" + content.digest()
    expected = []
    for index in range(5):
        draw = hashlib.sha256(key + index.to_bytes(4, "big")).digest()
        top, left = int.from_bytes(draw[:8], "big") % 5, int.from_bytes(draw[8:16], "big") % 7
        expected.append(image[:, top : top + 5, left : left + 5])
    assert torch.equal(RandomCrops([5, 5], tta=5, seed=7)(image), torch.stack(expected))


def test_read_verified_without_a_hash_reads_and_with_one_checks(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abc")
    assert read_verified(str(path), None) == b"abc"
    assert read_verified(str(path), hashlib.sha256(b"abc").hexdigest()) == b"abc"
    with pytest.raises(IntegrityError, match=r"weights\.bin changed after the model's files were checked"):
        read_verified(str(path), "0" * 64)

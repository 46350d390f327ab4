"""Fixtures of the Triton-kernel tests (run under ``TRITON_INTERPRET=1`` on CPU tensors)."""

import itertools

import pytest
import torch

INT32_MAX = 2**31 - 1


@pytest.fixture
def huge_strided(tmp_path):
    """Factory of views with strides so large that their element offsets exceed ``2**31`` (what int32
    offset arithmetic in a kernel would wrap), over a storage mapped from a sparse file: only the pages
    the view touches take memory or disk, whatever its span.

    ``huge_strided(shape, strides, dtype, offset=0)`` returns ``torch.as_strided(storage, shape,
    strides, offset)`` filled with ``randn`` values (the rest of the storage reads as zeros)."""
    counter = itertools.count()
    paths = []

    def make(shape, strides, dtype, offset=0):
        numel = offset + 1 + sum((size - 1) * stride for size, stride in zip(shape, strides))
        path = tmp_path / f"sparse_{next(counter)}.bin"
        paths.append(path)
        try:
            storage = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
        except (RuntimeError, OSError) as error:  # no sparse files / mappings this large here
            pytest.skip(f"cannot map a sparse {numel}-element storage: {error}")
        view = torch.as_strided(storage, shape, strides, offset)
        view.copy_(torch.randn(shape).to(dtype))
        return view

    yield make
    for path in paths:
        path.unlink(missing_ok=True)


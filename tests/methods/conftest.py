"""Fixtures of the method tests."""

import pytest
import torch


@pytest.fixture
def float64():
    """The comparisons run in float64, where rounding (~1e-16) cannot hide a formula difference and
    a 1e-5 relative bound is a statement about the math (fp32 rounding alone reaches ~1e-4 on
    gradients that pass through BatchNorm over 4 samples)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

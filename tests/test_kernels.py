"""Fused int8-row kernels: same results as casting then multiplying."""

import pytest
import torch
import torch.nn.functional as F

from rankcut.nn import kernels


def _ints(*shape, seed=0):
    return torch.randint(-127, 128, shape, dtype=torch.int8,
                         generator=torch.Generator().manual_seed(seed))


def test_kernels_build_on_this_machine():
    assert kernels.compiled() is not None, "gcc + ninja should build the int8 kernels here"


@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64: the fallback
def test_rows_dot_and_axpy_match_the_reference(lead, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, 37, generator=g, dtype=dtype)
    ints, scale = _ints(11, 37), torch.rand(11, generator=g)
    expected = F.linear(x, ints.to(dtype)) * scale.to(dtype)
    torch.testing.assert_close(kernels.rows_dot(x, ints, scale), expected, rtol=1e-5,
                               atol=1e-4)
    z = torch.randn(*lead, 11, generator=g, dtype=dtype)
    wide = _ints(11, 301, seed=2)
    torch.testing.assert_close(kernels.rows_axpy(z, wide), z @ wide.to(dtype), rtol=1e-5,
                               atol=1e-4)

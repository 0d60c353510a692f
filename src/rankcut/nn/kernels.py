"""Fused CPU kernels for int8 factor rows at decode size (few tokens per call).

Casting an int8 block to float32 before a matrix product writes 4 bytes for every byte
read, which makes a decode step 2–3× slower than float32 rows. These two loops read the
int8 rows once and convert in registers instead:

* ``rows_dot``: y[m, n] = scale[n] · Σ_k x[m, k] · ints[n, k]   (the W_v side, rows = W_v rows)
* ``rows_axpy``: y[m, n] = Σ_r z[m, r] · ints[r, n]             (the W_u side, rows = u_i)

They are compiled once per machine with ``torch.utils.cpp_extension.load_inline`` (gcc and
ninja; cached under torch's extension folder) the first time they are needed. Where that
fails, or for other dtypes and devices, the torch fallback (cast, then matmul) is used and
one warning is logged.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

torch::Tensor rows_dot(torch::Tensor x, torch::Tensor ints, torch::Tensor scale) {
  auto xc = x.contiguous();
  auto w = ints.contiguous();
  auto s = scale.to(torch::kFloat).contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* row = wp + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < K; ++k) acc += xr[k] * static_cast<float>(row[k]);
        yp[m * N + n] = acc * sp[n];
      }
    }
  });
  return y;
}

torch::Tensor rows_axpy(torch::Tensor z, torch::Tensor ints) {
  auto zc = z.contiguous();
  auto w = ints.contiguous();
  const int64_t M = zc.size(0), R = zc.size(1), N = w.size(1);
  auto y = torch::zeros({M, N}, zc.options());
  const float* zp = zc.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < M; ++m) {
      float* yr = yp + m * N;
      for (int64_t r = 0; r < R; ++r) {
        const float c = zp[m * R + r];
        const int8_t* row = wp + r * N;
#pragma omp simd
        for (int64_t n = begin; n < end; ++n) yr[n] += c * static_cast<float>(row[n]);
      }
    }
  });
  return y;
}
"""


@functools.cache
def compiled():
    """Returns the compiled kernel module, or None when it cannot be built here (logged
    once). Side effects: the first call compiles (tens of seconds) into torch's cache; when
    no ``ninja`` is on PATH, the pip ``ninja`` package's folder is appended to PATH."""
    try:
        from torch.utils.cpp_extension import load_inline

        if shutil.which("ninja") is None:
            import ninja

            os.environ["PATH"] += os.pathsep + ninja.BIN_DIR

        return load_inline("rankcut_int8_rows", cpp_sources=_SOURCE,
                           functions=["rows_dot", "rows_axpy"],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           extra_ldflags=["-fopenmp"])
    except Exception as err:  # no compiler, no ninja, a sandbox: fall back, say so once
        logger.warning("int8 row kernels unavailable (%s); using cast-then-matmul",
                       str(err).splitlines()[0] if str(err) else type(err).__name__)
        return None


def _fused(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32


def rows_dot(x: torch.Tensor, ints: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[..., K] · ([N, K] int8 · scale[N, None])ᵀ → [..., N]. Pure."""
    kernels = compiled() if _fused(x) else None
    if kernels is None:
        return F.linear(x, ints.to(x.dtype)) * scale.to(x.dtype)
    return kernels.rows_dot(x.reshape(-1, x.shape[-1]), ints, scale).view(
        *x.shape[:-1], ints.shape[0])


def rows_axpy(z: torch.Tensor, ints: torch.Tensor) -> torch.Tensor:
    """[..., R] @ [R, N] int8 → [..., N]. Pure."""
    kernels = compiled() if _fused(z) else None
    if kernels is None:
        return z @ ints.to(z.dtype)
    return kernels.rows_axpy(z.reshape(-1, z.shape[-1]), ints).view(*z.shape[:-1], ints.shape[1])

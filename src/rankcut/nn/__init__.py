"""The low-rank modules, their kernels and the compressed value cache."""

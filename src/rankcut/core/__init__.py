"""Pure tensor math, no modules or IO: statistics and whitening, whitened SVD, rank allocation,
the KL metric, int8 rows.
"""

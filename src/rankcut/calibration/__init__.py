"""Calibration data (text and image-text windows), the input-moment hooks, block replay and the
torch.distributed helpers.
"""

"""The compression engine: every strategy block by block over an executor (resident or
streamed), the correction stages, the parameter updates, the work folder.
"""

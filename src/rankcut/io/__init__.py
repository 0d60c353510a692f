"""Checkpoint IO: the format (markers, shard digests, config entry), loading, atomic writes of
outputs.
"""

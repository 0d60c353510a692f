"""Measurement: perplexity, zero-shot tasks, generation speed."""

"""Offline assets: wheels, wiki text, the bundled SmolLM2 and the test vision-language models."""

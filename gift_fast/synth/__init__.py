"""Synthetic data engine: prompts from class names, image generators, the writer."""

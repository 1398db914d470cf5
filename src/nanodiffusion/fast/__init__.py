"""Approximate fast paths, each off by default (docs/fast.md has their measured speed and quality cost):
DeepCache (deepcache.py), token merging (tome.py), guidance dropped for the last steps (guidance.py's
min_sigma), and a linear latent-to-RGB preview decoder (preview.py). FastOptions (options.py) selects them."""

from .options import FastOptions, fast_paths

__all__ = ["FastOptions", "fast_paths"]

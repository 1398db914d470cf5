"""Datasets: the synthetic captioned shapes scenes and users' captioned image folders."""

from .captions import COLORS, KINDS, RELATIONS, SHAPES, VOCABULARY, Prompt, caption, parse_caption
from .folder import ImageFolderDataset, image_captions
from .shapes import (
                     HELDOUT_PAIRS,
                     HELDOUT_RELATIONS,
                     PALETTE,
                     Obj,
                     Scene,
                     ShapesDataset,
                     heldout_prompts,
                     realize,
                     render,
                     sample_prompts,
                     sample_scene,
                     write_dataset,
)

__all__ = ["COLORS", "HELDOUT_PAIRS", "HELDOUT_RELATIONS", "KINDS", "PALETTE", "RELATIONS", "SHAPES", "VOCABULARY",
           "ImageFolderDataset", "Obj", "Prompt", "Scene", "ShapesDataset", "caption", "heldout_prompts",
           "image_captions", "parse_caption", "realize", "render", "sample_prompts", "sample_scene", "write_dataset"]

"""`nanodiff train vae|diffusion|builtin|controlnet|lcm [flags]`: dispatch to the training script of each stage."""

from __future__ import annotations

from ..errors import choice_error

KINDS = ("vae", "diffusion", "layout", "builtin", "controlnet", "tiny-vae", "lcm")


def main(argv: list[str]) -> None:
    """argv = [kind, *flags]; kind is vae (stage 1), diffusion (stage 2), builtin (both, then ship),
    controlnet (a layout ControlNet for a trained model) or lcm (a few-step student of a pipeline folder)."""
    kind, *rest = argv or [""]
    if kind == "vae":
        from .vae import main as run
    elif kind == "diffusion":
        from .diffusion import main as run
    elif kind == "layout":
        from .layout import main as run
    elif kind == "builtin":
        from .builtin import main as run
    elif kind == "controlnet":
        from .controlnet import main as run
    elif kind == "tiny-vae":
        from .tiny_vae import main as run
    elif kind == "lcm":
        from .lcm import main as run
    else:
        raise choice_error("training kind", kind, list(KINDS))
    run(rest)

"""`nanodiff train vae|diffusion|builtin [flags]`: dispatch to the training script of each stage."""

from __future__ import annotations

from ..errors import choice_error

KINDS = ("vae", "diffusion", "builtin")


def main(argv: list[str]) -> None:
    """argv = [kind, *flags]; kind is vae (stage 1), diffusion (stage 2) or builtin (both, then ship)."""
    kind, *rest = argv or [""]
    if kind == "vae":
        from .vae import main as run
    elif kind == "diffusion":
        from .diffusion import main as run
    elif kind == "builtin":
        from .builtin import main as run
    else:
        raise choice_error("training kind", kind, list(KINDS))
    run(rest)

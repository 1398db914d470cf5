"""Whether each packed layer runs as fast as it can: the layout packing.py gives it against one packed for its exact
input (docs/performance.md, "The exact fast path").

oneDNN picks a kernel, and with it a weight layout, by the input's whole shape; a weight packed for another shape
can run 30-80x slower. For every packed layer of a model's UNet (one CFG call, batch 2) and VAE decoder at SIZE px,
this times both layouts alternately (best of 4) and prints the layers where they differ by more than 1.3x, and the
totals. Uses the random SD 1.5-size folder of perf.py unless --model says otherwise.

    python benchmarks/pack_layouts.py --size 256 --precision float32     # ~2 min
"""

from __future__ import annotations

import argparse
import time

import torch

from nanodiffusion.packing import PackedWeight
from nanodiffusion.pipeline import Pipeline
from perf import WEIGHTS, make_weights


def layer_inputs(pipe: Pipeline, size: int, dtype: torch.dtype) -> list[tuple[str, PackedWeight, torch.Tensor]]:
    """(part, layer, input) for every packed layer call of one UNet call and one VAE decode."""
    calls = []
    for part, model in (("unet", pipe.unet), ("vae", pipe.vae)):
        for module in model.modules():
            if isinstance(module, PackedWeight):
                module.register_forward_pre_hook(
                    lambda m, args, part=part: calls.append((part, m, args[0].detach().clone()))
                    if m.packable(args[0]) else None)
    latent = size // 8
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, dtype=dtype)
    with torch.no_grad():
        pipe.unet(torch.randn(2, 4, latent, latent, dtype=dtype), torch.tensor([500, 500]), context)
        pipe.vae.decode(torch.randn(1, 4, latent, latent, dtype=dtype))
    return calls


def best_times(layer: PackedWeight, x: torch.Tensor, shapes: list[tuple[int, ...]], rounds: int = 4) -> list[float]:
    """Best-of-`rounds` seconds of the layer with its weight packed for each shape, timed alternately."""
    weights = [layer.pack(layer.weight.detach().to(x.dtype), shape) for shape in shapes]
    best = [float("inf")] * len(weights)
    with torch.no_grad():
        for weight in weights:
            layer.with_packed(x, weight)
        for _ in range(rounds):
            for i, weight in enumerate(weights):
                start = time.perf_counter()
                layer.with_packed(x, weight)
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a diffusers folder (default: perf.py's random SD 1.5 size)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    pipe = Pipeline.load(args.model or make_weights(WEIGHTS), precision=args.precision)
    totals: dict[str, list[float]] = {"unet": [0.0, 0.0], "vae": [0.0, 0.0]}
    measured: dict[tuple, list[float] | None] = {}
    for part, layer, x in layer_inputs(pipe, args.size, getattr(torch, args.precision)):
        shapes = [layer.pack_shape(x), layer.input_shape(x)]
        key = (tuple(layer.weight.shape), tuple(x.shape), x.dtype, type(layer))
        if key not in measured:
            measured[key] = None if shapes[0] == shapes[1] else best_times(layer, x, shapes)
            if measured[key] and max(measured[key]) > 1.3 * min(measured[key]):
                print(f"{part} weight {key[0]} input {key[1]}: as packed {1000 * measured[key][0]:.2f} ms, "
                      f"packed for this input {1000 * measured[key][1]:.2f} ms")
        for i, seconds in enumerate(measured[key] or []):
            totals[part][i] += seconds
    for part, (packed, exact) in totals.items():
        print(f"{part}: layers packed for another shape than their input's take {1000 * packed:.1f} ms a call; "
              f"packed for their input, {1000 * exact:.1f} ms")


if __name__ == "__main__":
    main()

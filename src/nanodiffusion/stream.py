"""Real-time img2img over a stream of frames, with the ideas of StreamDiffusion (Kodaira et al. 2023).

Each frame is encoded, noised to the sigma that `strength` selects and denoised in `steps` steps (1-4), always
with the same fixed noise, so a still scene gives a still picture. The ideas, each a switch, each measured in
benchmarks/stream.py (docs/stream.md):
- stream batch (sec. 3.2): the k denoising steps of k consecutive frames run as ONE network call on a batch
  of k latents, each at its own sigma; a frame comes out k - 1 frames later, one network call per frame.
- residual CFG, self-negative (sec. 3.3): the unconditional x0 estimate is not computed but taken from the
  noise that was added, x0_u = x - sigma * noise, so guidance costs no second pass:
  D~ = x0_u + cfg (D(x, sigma; c) - x0_u).
- stochastic similarity filter (sec. 3.5): a frame whose cosine similarity to the last processed input
  exceeds `similarity` is skipped (the last output is shown again), at most `max_skip` in a row.
- cached prompt embeddings (and the layout stage's slot map): encoded once per prompt, not per frame.
- a tiny distilled autoencoder (models/tiny_vae.py, `nanodiff train tiny-vae`) instead of the model's VAE.
- bf16 compute (autocast) for the network.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from PIL import Image

from .denoisers import Denoiser, append_dims
from .errors import NanoDiffusionError
from .guidance import cfg_denoiser
from .images import to_pil, to_tensor
from .prompts import check_prompt
from .samplers import get_sampler

GUIDANCE = ("none", "full", "self")
UPDATES = {"euler": "euler", "lcm": "lcm"}   # the step rule and the sampler whose sigma list it walks
BUILTIN_TINY_VAE = Path(__file__).parent / "weights" / "builtin_tiny_vae"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".gif")


@dataclass(frozen=True)
class StreamSettings:
    """What a stream does; the switches turn StreamDiffusion's ideas on and off."""

    prompt: str = ""
    negative: str = ""
    strength: float = 0.5
    steps: int = 2
    cfg: float = 1.5
    guidance: str = "self"          # "none": conditional only; "full": two passes (CFG); "self": residual CFG
    update: str = "euler"           # euler: ODE step; lcm: jump to x0 and re-noise (for LCM / Turbo models)
    stream_batch: bool = True
    similarity: float = 0.0         # skip frames more similar than this to the last processed one; 0: off
    max_skip: int = 10
    cache_prompt: bool = True
    tiny_vae: bool = True           # use the tiny autoencoder when one is loaded
    bf16: bool = False
    seed: int = 0
    size: int | None = None         # square frames of this side (default: the model's size)


def check_settings(s: StreamSettings) -> None:
    """Refuse settings a stream cannot run with, with one clear line."""
    if not 1 <= s.steps <= 8:
        raise NanoDiffusionError(f"steps {s.steps} is not allowed: a stream takes 1 to 8 steps per frame")
    if not 0.0 < s.strength <= 1.0:
        raise NanoDiffusionError(f"strength {s.strength} is not allowed: use a value in (0, 1]")
    if s.guidance not in GUIDANCE:
        raise NanoDiffusionError(f"unknown guidance {s.guidance!r}; choose one of: {', '.join(GUIDANCE)}")
    if s.update not in UPDATES:
        raise NanoDiffusionError(f"unknown update {s.update!r}; choose one of: {', '.join(UPDATES)}")
    if not math.isfinite(s.cfg) or not 0.0 <= s.similarity <= 1.0 or s.max_skip < 0:
        raise NanoDiffusionError("cfg must be finite, similarity in [0, 1] and max_skip >= 0")


def residual_cfg(denoiser: Callable[..., torch.Tensor], cond: dict[str, torch.Tensor], scale: float,
                 noise: torch.Tensor) -> Callable[..., torch.Tensor]:
    """Self-negative residual CFG (Kodaira et al. 2023, eq. 8 in x0 form): x0_u = x - sigma * noise,
    D~(x, sigma) = x0_u + scale (D(x, sigma; c) - x0_u); one network pass."""

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0 = denoiser(x, sigma, **cond)
        if scale == 1:
            return x0
        x0_uncond = x - append_dims(torch.as_tensor(sigma, dtype=x.dtype).reshape(-1), x.ndim) * noise
        return x0_uncond + scale * (x0 - x0_uncond)

    return guided


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two frames, flattened."""
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


class StreamDiffusion:
    """Frames in, frames out: `engine(frame)` returns a diffused frame (PIL); with stream batch it holds the frame
    k - 1 calls back (the first k - 1 calls show the first frame at lower noise levels)."""

    def __init__(self, pipe: Any, settings: StreamSettings, tiny_vae: torch.nn.Module | None = None):
        check_settings(settings)
        if getattr(pipe, "controlnet", None) is not None:
            raise NanoDiffusionError("streaming with a ControlNet is not supported: serve without --controlnet")
        if pipe.is_inpainting_model:
            raise NanoDiffusionError("streaming needs an ordinary model, not a 9-channel inpainting model")
        self.pipe, self.tiny = pipe, tiny_vae
        self.size = settings.size or pipe.default_size
        pipe.check_size(self.size, self.size)
        self.latent_side = self.size // pipe.vae_scale
        shape = (1, pipe.vae.config.latent_channels, self.latent_side, self.latent_side)
        self.noise = torch.randn(shape, generator=torch.Generator().manual_seed(settings.seed))
        self.settings = settings
        self.calls = 0           # network calls (a batch counts once)
        self.skipped = 0
        self.reset(settings)

    def reset(self, settings: StreamSettings) -> None:
        """Take new settings: prompt embeddings and sigmas are recomputed, the pipe of frames emptied."""
        check_settings(settings)
        old, self.settings = self.settings, settings
        if not hasattr(self, "cond") or (settings.prompt, settings.negative) != (old.prompt, old.negative):
            self.encode_prompt()
        info = get_sampler(UPDATES[settings.update])
        self.schedule = info.schedule(self.pipe.schedule)
        total = max(settings.steps, round(settings.steps / settings.strength))
        self.sigmas = info.sigmas(self.schedule, total)[-(settings.steps + 1):].float()
        self.buffer: torch.Tensor | None = None
        self.last_input: torch.Tensor | None = None
        self.last_output: Image.Image | None = None
        self.run_of_skips = 0

    def encode_prompt(self) -> None:
        """The text encoder (and the layout stage) once per prompt: the cached embeddings."""
        s, pipe = self.settings, self.pipe
        check_prompt(s.prompt, "prompt")
        check_prompt(s.negative, "negative prompt")
        text, loras = pipe.prompt_loras(s.prompt)
        if loras:
            raise NanoDiffusionError("<lora:...> tags are not supported in a stream prompt")
        with torch.no_grad():
            cond, uncond = pipe.encode_text([text], [s.negative], pipe.clip_skip)
            self.cond, self.uncond = pipe.guidance_inputs(cond, uncond, [torch.Generator().manual_seed(s.seed)],
                                                          self.latent_side, self.latent_side)

    def denoiser(self, batch: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The guided D(x, sigma) over a batch of `batch` latents (the pipeline's own network function)."""
        s, pipe = self.settings, self.pipe
        if not s.cache_prompt:
            self.encode_prompt()
        denoiser = Denoiser(pipe.unet_function(None, 1.0, self.size, self.size), self.schedule, pipe.prediction)
        cond, uncond = ({k: v.expand(batch, *v.shape[1:]) for k, v in c.items()} for c in (self.cond, self.uncond))
        if s.guidance == "full":
            return cfg_denoiser(denoiser, cond, uncond, s.cfg)
        return residual_cfg(denoiser, cond, s.cfg if s.guidance == "self" else 1.0, self.noise)

    def step(self, x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """One step from sigma to sigma_next per latent: Euler (x0 + sigma' (x - x0) / sigma) or LCM (x0 + sigma'
        * noise)."""
        sigma, sigma_next = append_dims(sigma, x.ndim), append_dims(sigma_next, x.ndim)
        direction = (x - x0) / sigma if self.settings.update == "euler" else self.noise
        return x0 + sigma_next * direction

    def network(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """One (batched) guided denoiser call, in bf16 when asked."""
        self.calls += 1
        autocast = torch.autocast("cpu", torch.bfloat16) if self.settings.bf16 else nullcontext()
        with autocast:
            return self.denoiser(x.shape[0])(x, sigma).float()

    @torch.no_grad()
    def encode(self, frame: torch.Tensor) -> torch.Tensor:
        """Pixels -> scaled latents (the posterior mean; the tiny encoder when used)."""
        if self.tiny is not None and self.settings.tiny_vae:
            return self.tiny.encode(frame)
        return self.pipe.vae.encode(frame).mode() * self.pipe.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels (the tiny decoder when used)."""
        if self.tiny is not None and self.settings.tiny_vae:
            return self.tiny.decode(latents)
        return self.pipe.decode(latents)

    @torch.no_grad()
    def denoise(self, z0: torch.Tensor) -> torch.Tensor:
        """Latents of a new frame -> the finished latents of this frame (sequential) or of the frame k - 1 back
        (stream batch)."""
        sigmas, k = self.sigmas, self.settings.steps
        x = z0 + sigmas[0] * self.noise
        if not self.settings.stream_batch or k == 1:
            for i in range(k):
                x = self.step(x, self.network(x, sigmas[i:i + 1]), sigmas[i:i + 1], sigmas[i + 1:i + 2])
            return x
        if self.buffer is None:   # first frame: fill the later stages with it, noised to their sigmas
            self.buffer = z0 + append_dims(sigmas[1:k], z0.ndim) * self.noise
        batch = torch.cat([x, self.buffer])
        moved = self.step(batch, self.network(batch, sigmas[:k]), sigmas[:k], sigmas[1:])
        self.buffer = moved[:-1]
        return moved[-1:]

    @torch.no_grad()
    def __call__(self, frame: Image.Image | torch.Tensor) -> Image.Image:
        """One frame in (PIL or [1, 3, H, W] in [-1, 1]), one diffused frame out."""
        pixels = to_tensor(frame, (self.size, self.size)) if isinstance(frame, Image.Image) else frame
        s = self.settings
        if (s.similarity > 0 and self.last_input is not None and self.run_of_skips < s.max_skip
                and cosine_similarity(pixels, self.last_input) > s.similarity):
            self.skipped += 1
            self.run_of_skips += 1
            return self.last_output
        self.last_input, self.run_of_skips = pixels, 0
        self.last_output = to_pil(self.decode(self.denoise(self.encode(pixels))))[0]
        return self.last_output


def load_tiny_vae(pipe: Any, path: str | None) -> torch.nn.Module | None:
    """--tiny-vae: "none", a folder, or "auto" (the shipped one for the built-in model, if it fits its VAE)."""
    from .models.tiny_vae import TinyAutoencoder, vae_fingerprint

    if path in (None, "none"):
        return None
    folder = BUILTIN_TINY_VAE if path == "auto" else Path(path)
    if path == "auto" and not folder.is_dir():
        return None
    tiny = TinyAutoencoder.load(folder)
    fits = tiny.config.teacher == vae_fingerprint(pipe.vae)
    if not fits and path == "auto":
        return None
    if not fits:
        raise NanoDiffusionError(f"the tiny VAE in {folder} was distilled from another VAE than this model's: "
                                 "train one for it with `nanodiff train tiny-vae --model ...`")
    return tiny


def read_frames(source: str | Path) -> Iterator[Image.Image]:
    """Frames of a video file (PyAV) or of an image folder (sorted by name), as RGB images."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise NanoDiffusionError(f"{source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for file in files:
            with Image.open(file) as image:
                yield image.convert("RGB")
        return
    if not source.is_file():
        raise NanoDiffusionError(f"stream source {source} does not exist: pass a video file or an image folder")
    av = import_av()
    try:
        with av.open(str(source)) as container:
            for frame in container.decode(video=0):
                yield frame.to_image()
    except av.error.FFmpegError as error:
        raise NanoDiffusionError(f"cannot read the video {source}: {error}") from None


def import_av() -> Any:
    """PyAV, or a clear error naming the extra to install."""
    try:
        import av
    except ImportError:
        raise NanoDiffusionError("video files need PyAV: pip install 'nanodiffusion[video]' (or pip install av)"
                                 ) from None
    return av


class FrameWriter:
    """Write frames to a video file (by suffix, PyAV) or, for a path without a video suffix, a folder of PNGs."""

    def __init__(self, path: str | Path, fps: float = 30.0):
        self.path, self.fps, self.count = Path(path), fps, 0
        self.container = self.video = None
        if self.path.suffix.lower() in VIDEO_SUFFIXES:
            self.av = import_av()
            self.path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self.path.mkdir(parents=True, exist_ok=True)

    def write(self, image: Image.Image) -> None:
        """Append one frame."""
        if self.path.suffix.lower() not in VIDEO_SUFFIXES:
            image.save(self.path / f"{self.count:05d}.png")
        else:
            if self.container is None:
                self.container = self.av.open(str(self.path), "w")
                self.video = self.container.add_stream("mpeg4", rate=round(self.fps))
                self.video.width, self.video.height = image.size
                self.video.pix_fmt = "yuv420p"
            for packet in self.video.encode(self.av.VideoFrame.from_image(image)):
                self.container.mux(packet)
        self.count += 1

    def close(self) -> None:
        """Flush and close the video file."""
        if self.container is not None:
            for packet in self.video.encode():
                self.container.mux(packet)
            self.container.close()


@dataclass
class StreamStats:
    """Per-frame timings of a run: wall and CPU time of each call, frame latency, skips."""

    seconds: list[float]
    cpu_seconds: list[float]
    latency: list[float]
    frames: int
    skipped: int
    wall: float
    cpu: float

    def summary(self) -> dict[str, float]:
        """FPS (frames / wall time), CPU FPS (frames / CPU time of this process), the CPU FPS of the median and of
        the 10th-percentile frame (on a crowded machine, the closest to what a free core gives), median and p95
        latency in ms, skipped frames."""
        def pct(values: list[float], q: float) -> float:
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

        return {"frames": self.frames, "fps": self.frames / self.wall, "cpu_fps": self.frames / max(self.cpu, 1e-9),
                "cpu_fps_median_frame": 1 / max(pct(self.cpu_seconds, 0.5), 1e-9),
                "cpu_fps_p10_frame": 1 / max(pct(self.cpu_seconds, 0.1), 1e-9),
                "latency_ms_median": pct(self.latency, 0.5) * 1000, "latency_ms_p95": pct(self.latency, 0.95) * 1000,
                "skipped": self.skipped}


def run_stream(engine: StreamDiffusion, frames: Iterable[Image.Image],
               sink: Callable[[Image.Image], None] | None = None) -> StreamStats:
    """Push every frame through the engine as fast as it goes. Latency of frame n: from its arrival to the output
    that holds it (k - 1 calls later with stream batch)."""
    lag = engine.settings.steps - 1 if engine.settings.stream_batch else 0
    arrivals, seconds, cpu_seconds, latency = [], [], [], []
    start, cpu = time.perf_counter(), time.process_time()
    for frame in frames:
        arrivals.append(time.perf_counter())
        frame_cpu = time.process_time()
        out = engine(frame)
        done = time.perf_counter()
        seconds.append(done - arrivals[-1])
        cpu_seconds.append(time.process_time() - frame_cpu)
        if len(arrivals) > lag:
            latency.append(done - arrivals[-1 - lag])
        if sink is not None:
            sink(out)
    return StreamStats(seconds, cpu_seconds, latency, len(arrivals), engine.skipped, time.perf_counter() - start,
                       time.process_time() - cpu)


def run_stream_command(args: Any) -> dict[str, float]:
    """`nanodiff stream SOURCE -o OUT`: diffuse every frame of a video or image folder into a video or folder."""
    from .pipeline import Pipeline

    pipe = Pipeline.load(args.model)
    settings = StreamSettings(prompt=args.prompt, negative=args.negative, strength=args.strength, steps=args.steps,
                              cfg=args.cfg, guidance=args.guidance, update=args.update,
                              stream_batch=not args.no_stream_batch, similarity=args.similarity,
                              bf16=args.bf16, seed=args.seed, size=args.size)
    tiny = load_tiny_vae(pipe, args.tiny_vae)
    engine = StreamDiffusion(pipe, replace(settings, tiny_vae=tiny is not None), tiny)
    writer = FrameWriter(args.output, args.fps)
    try:
        stats = run_stream(engine, read_frames(args.source), writer.write)
    finally:
        writer.close()
    summary = stats.summary()
    print(f"stream: {summary['frames']} frames, {summary['fps']:.1f} FPS, latency median "
          f"{summary['latency_ms_median']:.0f} ms / p95 {summary['latency_ms_p95']:.0f} ms, "
          f"{summary['skipped']} skipped -> {args.output}")
    return summary


def main(argv: list[str] | None = None) -> dict[str, float]:
    """`nanodiff stream SOURCE [flags]`."""
    import argparse

    parser = argparse.ArgumentParser(prog="nanodiff stream", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="video file (needs the 'video' extra: pip install av) or image folder")
    parser.add_argument("-o", "--output", default="stream-out", help="video file (.mp4 ...) or folder of PNGs")
    parser.add_argument("--prompt", default="", help="what the frames should become")
    parser.add_argument("--negative", default="")
    parser.add_argument("--model", default=None)
    parser.add_argument("--strength", type=float, default=0.5, help="how far each frame is noised (0-1]")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per frame (1-4 is real time)")
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--guidance", default="self", choices=GUIDANCE,
                        help="self: residual CFG (one pass); full: classic CFG (two passes); none")
    parser.add_argument("--update", default="euler", choices=list(UPDATES),
                        help="euler (ordinary models) or lcm (LCM / Turbo models)")
    parser.add_argument("--no-stream-batch", action="store_true", help="run a frame's steps one after another")
    parser.add_argument("--similarity", type=float, default=0.0,
                        help="skip frames with cosine similarity above this to the last one (e.g. 0.995; 0: off)")
    parser.add_argument("--tiny-vae", default="auto", help="auto (the shipped one if it fits), none, or a folder")
    parser.add_argument("--bf16", action="store_true", help="run the network in bfloat16 (autocast)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=None, help="frame side in pixels (default: the model's)")
    parser.add_argument("--fps", type=float, default=30.0, help="frame rate of a video output")
    return run_stream_command(parser.parse_args(argv))

"""The popular web UI's (AUTOMATIC1111 1.10) sampler and scheduler names, resolved to this project's samplers.

One function, `resolve_sampler`, for the server and the CLI. It follows the web UI's rules
(modules/sd_samplers.py `get_sampler_and_scheduler`, modules/sd_schedulers.py, the per-sampler "Automatic"
schedule in modules/sd_samplers_kdiffusion.py): a name may end in a scheduler ("DPM++ 2M Karras"), unknown
names fall back to a default instead of failing, and "Automatic" picks the sampler's own schedule (DPM++ 2M ->
Karras). Where the web UI does something this project has no implementation of, the fall-back is named in a
warning, never silent.
"""

from __future__ import annotations

from dataclasses import dataclass

from .samplers import SAMPLERS

DEFAULT_SAMPLER = "DPM++ 2M"   # the web UI's fall-back for an unknown sampler name (its samplers[0])
MISSING_SAMPLER = "Euler"      # what its API uses when a request names no sampler (sampler_index's default)


@dataclass(frozen=True)
class WebSampler:
    """A web UI sampler: its name, aliases, the schedule its "Automatic" means, and ours (None: not here)."""

    name: str
    aliases: tuple[str, ...]
    automatic: str = "uniform"
    ours: str | None = None


@dataclass(frozen=True)
class WebScheduler:
    """A web UI scheduler: name, label, aliases, default rho, and our sigma spacing (None: not here)."""

    name: str
    label: str
    aliases: tuple[str, ...] = ()
    default_rho: float = -1
    need_inner_model: bool = False
    ours: str | None = None


WEB_SAMPLERS = [
    WebSampler("DPM++ 2M", ("k_dpmpp_2m",), "karras", "dpmpp_2m"),
    WebSampler("DPM++ SDE", ("k_dpmpp_sde",), "karras", "dpmpp_sde"),
    WebSampler("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), "exponential", "dpmpp_2m_sde"),
    WebSampler("DPM++ 2M SDE Heun", ("k_dpmpp_2m_sde_heun",), "exponential"),
    WebSampler("DPM++ 2S a", ("k_dpmpp_2s_a",), "karras", "dpmpp_2s_a"),
    WebSampler("DPM++ 3M SDE", ("k_dpmpp_3m_sde",), "exponential"),
    WebSampler("Euler a", ("k_euler_a", "k_euler_ancestral"), ours="euler_a"),
    WebSampler("Euler", ("k_euler",), ours="euler"),
    WebSampler("LMS", ("k_lms",), ours="lms"),
    WebSampler("Heun", ("k_heun",), ours="heun"),
    WebSampler("DPM2", ("k_dpm_2",), "karras", "dpm2"),
    WebSampler("DPM2 a", ("k_dpm_2_a",), "karras"),
    WebSampler("DPM fast", ("k_dpm_fast",)),
    WebSampler("DPM adaptive", ("k_dpm_ad",)),
    WebSampler("Restart", ("restart",), "karras"),
    WebSampler("DDIM", ("ddim",), ours="ddim"),
    WebSampler("DDIM CFG++", ("ddim_cfgpp",)),
    WebSampler("PLMS", ("plms",), ours="plms"),
    WebSampler("UniPC", ("unipc",), ours="unipc"),
    WebSampler("LCM", ("k_lcm", "lcm"), ours="lcm"),
]
# this project's samplers the web UI lacks, under their own names (their "Automatic" is the model's spacing)
WEB_SAMPLERS += [WebSampler(info.display_name, (key,), ours=key) for key, info in SAMPLERS.items()
                 if key not in {s.ours for s in WEB_SAMPLERS}]

# polyexponential at the web UI's default rho 1 is exactly the exponential spacing; "normal" and "uniform" both
# space timesteps evenly from the top, which is the model's own ("default") spacing here.
WEB_SCHEDULERS = [
    WebScheduler("automatic", "Automatic"),
    WebScheduler("uniform", "Uniform", ("default",), need_inner_model=True, ours="default"),
    WebScheduler("karras", "Karras", default_rho=7.0, ours="karras"),
    WebScheduler("exponential", "Exponential", ours="exponential"),
    WebScheduler("polyexponential", "Polyexponential", default_rho=1.0, ours="exponential"),
    WebScheduler("sgm_uniform", "SGM Uniform", ("SGMUniform",), need_inner_model=True),
    WebScheduler("kl_optimal", "KL Optimal"),
    WebScheduler("align_your_steps", "Align Your Steps"),
    WebScheduler("simple", "Simple", need_inner_model=True),
    WebScheduler("normal", "Normal", need_inner_model=True, ours="default"),
    WebScheduler("ddim", "DDIM", need_inner_model=True),
    WebScheduler("beta", "Beta", need_inner_model=True),
]

SAMPLER_NAMES = {key.lower(): s for s in WEB_SAMPLERS for key in (s.name, *s.aliases, s.ours or s.name)}
SCHEDULER_NAMES = {key.lower(): s for s in WEB_SCHEDULERS for key in (s.name, s.label, *s.aliases)}
SCHEDULE_LABELS = {"default": "Uniform", "karras": "Karras", "exponential": "Exponential"}


def split_scheduler(name: str) -> tuple[str, WebScheduler | None]:
    """"DPM++ 2M Karras" -> ("DPM++ 2M", Karras); a name with no scheduler suffix -> (name, None)."""
    lowered = name.lower()
    for scheduler in WEB_SCHEDULERS:
        for option in (scheduler.label, scheduler.name, *scheduler.aliases):
            if lowered.endswith(" " + option.lower()):
                return name[: -len(option) - 1].strip(), scheduler
    return name, None


def resolve_sampler(name: str | None, scheduler: str | None) -> tuple[str, str, list[str]]:
    """A web UI sampler name (aliases, "X Karras" forms, our ids) and scheduler name -> (our sampler key, our
    sigma spacing, warnings). Unknown or unimplemented names fall back the way the web UI does, with a warning."""
    warnings: list[str] = []
    sampler_name, from_suffix = split_scheduler((name or "").strip() or MISSING_SAMPLER)
    sampler = SAMPLER_NAMES.get(sampler_name.lower())
    if sampler is None or sampler.ours is None:
        fallback = SAMPLER_NAMES[DEFAULT_SAMPLER.lower()]
        reason = "is unknown" if sampler is None else "is not implemented here"
        warnings.append(f"sampler {name!r} {reason}: used {fallback.name}")
        sampler = fallback
    chosen = from_suffix or SCHEDULER_NAMES.get((scheduler or "automatic").strip().lower())
    automatic = SCHEDULER_NAMES[sampler.automatic]
    if chosen is None or (chosen.name != "automatic" and chosen.ours is None):
        reason = "is unknown" if chosen is None else "is not implemented here"
        asked = scheduler if from_suffix is None else from_suffix.label
        warnings.append(f"scheduler {asked!r} {reason}: used {automatic.label}, the Automatic choice for "
                        f"{sampler.name}")
        chosen = automatic
    if chosen.name == "automatic":
        chosen = automatic
    return sampler.ours, chosen.ours, warnings


def scheduler_label(schedule: str) -> str:
    """Our sigma spacing as the web UI labels it ("karras" -> "Karras", "default" -> "Uniform")."""
    return SCHEDULE_LABELS.get(schedule, schedule)

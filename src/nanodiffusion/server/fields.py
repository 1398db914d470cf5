"""The web UI's txt2img / img2img fields this server cannot honour yet: a value that asks for them is a 422 naming
the field, never silently dropped. Values that mean "off" pass (clients send them all the time).

One row per field: (what the field asks for, a check that its value is "off" given the whole body). Supporting a
feature = deleting its row and passing the field to the pipeline. Fields that only matter together with another
one (script_args with script_name) have no row: the web UI ignores them too while that one is off; script_name may
name the X/Y/Z plot (xyz_script.py). Hires fix, variation seeds, seed resize, tiling, inpainting the masked area
only ("inpaint_full_res") and a refiner (refiner_checkpoint, refiner_switch_at) are honoured (jobs.py).
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import NanoDiffusionError


def off(*values: Any) -> Callable[[Any, dict], bool]:
    """A check: the value is None or one of `values`."""
    return lambda value, body: value is None or value in values


def same_as_first_pass(*values: Any) -> Callable[[Any, dict], bool]:
    """A hires fix setting that may only say "as the first pass" (or that hires fix is off)."""
    return lambda value, body: not body.get("enable_hr") or value in (None, "", *values)


UNSUPPORTED: dict[str, tuple[str, Callable[[Any, dict], bool]]] = {
    "hr_checkpoint_name": ("another checkpoint for the hires pass", same_as_first_pass("Use same checkpoint")),
    "hr_sampler_name": ("another sampler for the hires pass", same_as_first_pass("Use same sampler")),
    "hr_scheduler": ("another scheduler for the hires pass", same_as_first_pass("Use same scheduler")),
    "hr_prompt": ("another prompt for the hires pass", same_as_first_pass()),
    "hr_negative_prompt": ("another negative prompt for the hires pass", same_as_first_pass()),
    "restore_faces": ("face restoration", off(False)),
    "script_name": ("scripts other than the X/Y/Z plot",
                    lambda value, body: value in (None, "", "None") or str(value).strip().lower() == "x/y/z plot"),
    "firstpass_image": ("a first-pass image", off("")),
    "disable_extra_networks": ("turning off <lora:> tags", off(False)),
    "s_churn": ("s_churn", off(0)),
    "s_tmin": ("s_tmin", off(0)),
    "s_tmax": ("s_tmax", off(0)),
    "s_noise": ("s_noise", off(1)),
    "s_min_uncond": ("s_min_uncond", off(0)),
    "initial_noise_multiplier": ("an initial noise multiplier", off(1)),
    "latent_mask": ("a latent mask", off("")),
    "infotext": ("infotext pasting", off("")),
}


def check_unsupported(body: dict[str, Any]) -> None:
    """422 (a NanoDiffusionError) for the first field whose value asks for something this server lacks."""
    for field, (feature, fine) in UNSUPPORTED.items():
        value = body.get(field)
        if not fine(value, body):
            raise NanoDiffusionError(f"{field}={value!r} asks for {feature}, which this server does not support "
                                     f"yet: leave {field} out")

"""The one error type users see: a clear, one-line message naming the problem and the fix."""


class NanoDiffusionError(ValueError):
    """A problem with the user's input (file, setting, prompt) that they can fix."""


def choice_error(kind: str, name: object, choices: list[str]) -> NanoDiffusionError:
    """Error for an unknown name, listing the valid choices."""
    return NanoDiffusionError(f"unknown {kind} {name!r}; choose one of: {', '.join(choices)}")

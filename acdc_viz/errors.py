"""The errors acdc_viz raises. Each message says what was wrong, what was expected, what to do."""


class AcdcVizError(Exception):
    """Base class of every error acdc_viz raises on purpose."""


class ModelSupportError(AcdcVizError, TypeError):
    """The model lacks something the engine needs, or has a feature it does not model."""


class SettingsError(AcdcVizError, ValueError):
    """An invalid setting: tau, metric, ablation, device, dtype."""


class DataError(AcdcVizError, ValueError):
    """Token pairs (or the file or batch holding them) are not usable by ACDC.

    A ``ValueError`` too, so that callers that already catch bad-argument errors catch this.
    """


class ModelLoadError(AcdcVizError, RuntimeError):
    """The model could not be loaded; the message says why and how to provide it."""


class RunOutOfMemory(AcdcVizError, RuntimeError):
    """The device ran out of memory during a run; the steps so far are kept on the exception."""

    def __init__(self, message: str, trace: object = None) -> None:
        super().__init__(message)
        self.trace = trace


def describe(exc: BaseException, limit: int | None = None) -> str:
    """``"TypeName: first line of the message"``, cut to ``limit`` characters (with "...")."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."

"""The errors acdc_viz raises. Each message says what was wrong, what was expected, and what to do."""


class AcdcVizError(Exception):
    """Base class of every error acdc_viz raises on purpose."""


class ModelSupportError(AcdcVizError, TypeError):
    """The model lacks something the engine needs, or has a feature it does not model."""


class SettingsError(AcdcVizError, ValueError):
    """An invalid setting: tau, metric, ablation, device, dtype."""


class RunOutOfMemory(AcdcVizError, RuntimeError):
    """The device ran out of memory during a run; the steps so far are kept on the exception."""

    def __init__(self, message: str, trace: object = None) -> None:
        super().__init__(message)
        self.trace = trace

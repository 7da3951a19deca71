"""User-facing errors.

Every error a user can cause by configuration or by the files on their machine is a
:class:`PilotError`. Its message says what is wrong and how to fix it; the entry point prints
it without a traceback and exits with status 2.
"""


class PilotError(Exception):
    """Base class of the errors that describe a problem with the user's setup."""


class ConfigError(PilotError):
    """A configuration value that cannot work (unknown key, impossible split, wrong type...)."""


class DatasetError(PilotError):
    """A dataset root, folder or image that is missing or unreadable."""


class WeightsUnavailableError(PilotError):
    """Pretrained weights that cannot be loaded (no network, no cache, bad checkpoint path)."""


class IncompatibleBackboneError(ConfigError):
    """A learner was given a backbone family it cannot work with (e.g. a prompt learner and a CNN)."""


class ResumeError(PilotError):
    """A run directory that cannot be resumed (no checkpoint, or a different configuration)."""

"""User-facing errors.

Every error a user can cause by configuration or by the files on their machine is a
:class:`PilotError`. Its message says what is wrong and how to fix it; the entry point prints
it without a traceback and exits with the error's ``exit_code`` (2, except for interruptions).
"""


class PilotError(Exception):
    """Base class of the errors that describe a problem with the user's setup."""

    exit_code: int = 2


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


class CheckpointError(ResumeError):
    """A ``checkpoint.pt`` that cannot be read (truncated, damaged, or not written by pilot)."""


class RunDirBusyError(PilotError):
    """Another pilot run holds the lock of the run directory."""


class ResultsExistError(ConfigError):
    """The run directory already holds results and neither ``resume`` nor ``overwrite`` was asked for."""


class RunInterruptedError(PilotError):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM. Finished sessions are on disk; the
    message says which, and the command that resumes. The exit code is the shell's: 128 + signal."""

    exit_code: int = 130

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code

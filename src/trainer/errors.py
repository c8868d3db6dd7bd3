"""User-facing errors: anything the user can fix by changing input.

The CLI prints these as one `error: ...` line and exits with code 2; anything
else is a bug and keeps its traceback. A message whose details are long (every
source a download tried) may follow its first line with detail lines, each
indented by two spaces; the first line alone says what is wrong and what to do.
"""


class UserError(Exception):
    """Bad input that the user can fix: config, data, checkpoint, device."""


class ConfigError(UserError):
    """A config value is missing, misspelled or out of range."""


class RunDirInUseError(ConfigError):
    """The run folder holds an earlier run's files; a new run there would overwrite them."""


class DataError(UserError):
    """Dataset files are missing, corrupt or cannot be fetched."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, unsafe or does not fit the model."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or Inf (fix: lower lr, clip gradients, nan_policy=skip)."""


class Preempted(Exception):
    """A preemption signal arrived; the state is saved and the run should be requeued."""

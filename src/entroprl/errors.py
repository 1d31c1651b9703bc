"""Every error a user acts on, in one place: the command line (`entroprl.cli`) shows each of
`USER_ERRORS` as one line, and any other exception, a bug of entroprl's, with its traceback. No
torch here, so that the commands that only read logs start fast.

Each class is also importable from where it was raised first (`entroprl.algos.checks`,
`entroprl.algos.losses`, `entroprl.tasks.base`, `entroprl.train.checkpoint`).
"""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


class InputError(ValueError):
    """Something the user gave (a file, a log, a dataset, a command-line value, a choice) cannot
    be used; the message names it and says why."""


class SettingError(ValueError):
    """A loss setting out of range; `key` names it, so that a configuration can name the whole
    dotted key (`algorithm.loss.clip_cov.ratio`)."""

    def __init__(self, key: str, why: str):
        super().__init__(f"{key} {why}")
        self.key, self.why = key, why


class NonFiniteError(ValueError):
    """A tensor holds NaN or inf where numbers are needed; the message says which and where."""


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why."""


class RewardError(RuntimeError):
    """A task's reward function raised; the message names the task, the rollout and the error."""


class DamagedCheckpoint(Exception):
    """A checkpoint fails verification; the message says what is wrong with it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run; the message says what it leaves behind. A KeyboardInterrupt,
    so that code catching that still catches it."""


USER_ERRORS = (
    ConfigError,
    InputError,
    SettingError,
    NonFiniteError,
    TrainingError,
    RewardError,
    DamagedCheckpoint,
)
"""What the command line shows as one line (Ctrl-C, `Interrupted`, has its own exit status)."""

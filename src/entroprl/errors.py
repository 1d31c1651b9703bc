"""The errors a user acts on, one line each at the command line (`entroprl.cli`); no torch here,
so that the commands that only read logs start fast."""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run; the message says what it leaves behind. A KeyboardInterrupt,
    so that code catching that still catches it."""

"""entroprl: RL with verifiable rewards for reasoning LMs, with policy entropy under control."""

from entroprl import _moved

__version__ = "0.1.0"

_moved.install()

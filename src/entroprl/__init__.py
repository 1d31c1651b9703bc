"""entroprl: RL with verifiable rewards for reasoning LMs, with policy entropy under control."""

__version__ = "0.1.0"

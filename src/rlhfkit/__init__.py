"""rlhfkit: reinforcement learning from human feedback, from labels to an aligned model.

Stages, each its own module, data flowing one way:
``data`` -> ``generation``/``labeling`` -> ``reward`` -> ``ppo`` -> ``evaluation`` -> ``serving``.
"""

__version__ = "0.1.0"

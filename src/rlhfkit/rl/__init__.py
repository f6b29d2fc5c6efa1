"""RL fine-tuning: one file per algorithm, and what they share.

- ``ppo``, ``grpo``, ``rloo``: online algorithms; each file's ``train`` is its loop, step by step.
- ``dpo``: direct preference optimisation from a preference file (no reward model, no sampling).
- ``run``: what the online ones share (options, models, optimizer, monitor, run directory);
  ``roles`` (policy, reference, critic, reward on one base), ``rollout`` (sampling k completions per
  prompt), ``scoring`` (reward model, judge or function), ``losses`` (every formula), ``monitor``
  (reward-hacking detectors and the held-out judge).
"""

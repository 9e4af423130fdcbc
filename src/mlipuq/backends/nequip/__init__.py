"""NequIP backend: training with per-epoch error logging, run folders, inference.

Import-light on purpose: importing this package does not import torch or nequip.
The modules are

- :mod:`~mlipuq.backends.nequip.config`: NequIP YAML configs for size presets;
- :mod:`~mlipuq.backends.nequip.callback`: the Lightning callback that writes error
  trajectories into a :class:`~mlipuq.trajectory_store.TrajectoryStore`;
- :mod:`~mlipuq.backends.nequip.training`: ``train_ensemble`` (``mlipuq train``).
"""

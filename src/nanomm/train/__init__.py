"""Training: mixed precision and loss scaling (precision.py, loss_scale.py), the loop, checkpoints.

Import the submodules directly (``from nanomm.train.precision import MixedPrecision``); this package
imports nothing itself, so ``import nanomm.train`` stays cheap.
"""

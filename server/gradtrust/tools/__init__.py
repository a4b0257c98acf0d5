"""Offline tools on top of everything else: ``prepare`` (turn a classifier into a
model-repository entry), ``evaluate`` and ``calibrate``, and the demo model's training.
They may import every layer below; nothing below imports them."""

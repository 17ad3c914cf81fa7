"""The trainer: configuration, launch, data, parallelism, checkpoints, logging, faults.

Nothing else in the project imports this package; it imports everything else.
"""

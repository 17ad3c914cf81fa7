"""Test helpers: fresh random tensors, poisoned outputs, and a pool of gloo ranks."""

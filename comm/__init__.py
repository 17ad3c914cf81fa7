"""Placeholder; see README status."""

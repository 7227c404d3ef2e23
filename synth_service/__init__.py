"""Synthesis: the inversion engine (pure torch) and, on top of it, the service layers."""

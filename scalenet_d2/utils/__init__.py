"""Measuring and showing: FLOPs, speed and memory (profiling.py), comparison tables of runs
(comparison.py) and pictures (pictures.py)."""

"""Benchmarks run on demand (``napari-semicl bench ...``): label efficiency and speed.

No Qt here; the UI-latency probe lives in :mod:`napari_semicl.widgets.ui_probe` and is
started as a subprocess by the CLI.
"""

"""Benchmarks and benchmark data for dcbnode (not part of the installed package).

Scripts here run as ``python bench/<name>.py`` from the repository root; they put the repository root on
``sys.path`` themselves so that ``bench.*`` and ``tests.peers`` import without installing anything.
"""

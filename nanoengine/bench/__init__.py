"""Benchmarks: measured figures for the lessons and docs/benchmarks.md (``nanoengine bench``)."""

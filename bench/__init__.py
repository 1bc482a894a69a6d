"""Benchmark scripts, run as modules from the repository root: `python -m bench.<script> --help`.

measure.py is how every script measures (threads, timing, the conditions printed with a result);
common.py holds the cached builds and the byte / FLOP accounting the roofline judges by.
"""

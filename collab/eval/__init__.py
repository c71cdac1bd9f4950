"""Evaluation of the method: `python -m collab.eval --help`."""

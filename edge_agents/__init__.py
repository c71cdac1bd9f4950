"""Simulated edge devices speaking the public HTTP protocol."""

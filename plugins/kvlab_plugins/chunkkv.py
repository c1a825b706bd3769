"""Placeholder: the chunkkv plugin module is being written (registers nothing yet)."""

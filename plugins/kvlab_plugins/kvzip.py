"""Placeholder: the kvzip plugin module is being written (registers nothing yet)."""

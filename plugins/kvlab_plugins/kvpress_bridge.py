"""Placeholder: the kvpress_bridge plugin module is being written (registers nothing yet)."""

"""First-party kvpress-lab plugins.

Every module here is a plain pluggy plugin listed under the ``kvpress_lab`` entry-point group in
the project's pyproject.toml, exactly as a third party's plugin would be.
"""

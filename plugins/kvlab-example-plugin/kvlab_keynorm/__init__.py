"""Example kvpress-lab plugin: the ``keynorm`` policy and its ``keynorm`` scorer."""

from kvlab_keynorm.plugin import KeyNormPolicy, KeyNormScorer

__all__ = ["KeyNormPolicy", "KeyNormScorer"]

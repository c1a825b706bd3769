"""Tensor-level building blocks shared by scorers, selectors and the engine.

- :mod:`kvpress_lab.ops.rope`: RoPE helpers and key re-rotation after cache compaction.
- :mod:`kvpress_lab.ops.lsh`: SimHash LSH scoring used by LASER-KV.
"""

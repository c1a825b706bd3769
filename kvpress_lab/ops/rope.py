"""Rotary position embedding (RoPE) helpers and key re-rotation.

After a KV cache is compacted, the kept keys still carry the RoPE rotation of their OLD positions.
Policies that re-assign positions (StreamingLLM, FINCH) move them to NEW positions. RoPE rotations
compose, R(new) = R(new - old) R(old), so a kept key is rotated by the position delta only; the
pre-RoPE keys are never needed.

Conventions follow transformers' llama / mistral / qwen2 / qwen3 implementation ("rotate_half":
the two halves of the head dimension form the rotated pairs).

Exactness: re-rotation is exact only while the model's inverse frequencies ``inv_freq`` do not
depend on the positions being processed. That holds for the rope types "default", "linear",
"llama3" and "yarn". "dynamic" (dynamic NTK) recomputes ``inv_freq`` from the sequence length, so
keys computed at different lengths used different frequencies; :func:`rerotate_keys` refuses it.
"longrope" switches between a short and a long frequency set depending on whether the forward
pass reaches ``original_max_position_embeddings``; re-rotation uses the set the module currently
holds (the one of its most recent forward pass) and is exact when the keys were produced with
that same set.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvpress_lab.errors import ConfigError

__all__ = ["AngleTables", "angle_table", "apply_rope", "rerotate_keys", "rotate_half"]


def rotate_half(x: Tensor) -> Tensor:
    """Map the halves ``(x1, x2)`` of the last dimension to ``(-x2, x1)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` by RoPE: ``x * cos + rotate_half(x) * sin`` (cos/sin broadcastable to x)."""
    return x * cos + rotate_half(x) * sin


def _rope_type(rotary_emb: torch.nn.Module) -> object:
    rope_type = getattr(rotary_emb, "rope_type", None)
    if rope_type is None:
        params = getattr(getattr(rotary_emb, "config", None), "rope_parameters", None)
        if isinstance(params, dict):
            rope_type = params.get("rope_type", params.get("type"))
    return rope_type


def _check_positions(name: str, positions: Tensor, kv_heads: int, n: int) -> None:
    if not isinstance(positions, Tensor) or positions.is_floating_point() or positions.is_complex():
        raise ValueError(f"{name} must be an integer tensor of positions, got {positions!r:.80}")
    if tuple(positions.shape) not in ((n,), (kv_heads, n)):
        raise ValueError(
            f"{name} must have shape [{n}] or [{kv_heads}, {n}] to match keys "
            f"[batch, {kv_heads}, {n}, head_dim], got {list(positions.shape)}"
        )


def _angles(positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotation angles [..., n, head_dim/2], formed exactly as transformers does (float32)."""
    return positions.to(torch.float32).unsqueeze(-1) * inv_freq


def angle_table(rope: object, n_positions: int, device: torch.device | str) -> Tensor:
    """Angles of positions ``0..n_positions-1`` for ``rope``: float32 [n_positions, rotary_dim/2].

    Row ``p`` is exactly what :func:`rerotate_keys` would form for position ``p`` (the same float32
    product), so passing the table as ``angles=`` changes no bit of the result; it lets one table
    serve every layer (and both old and new positions) of a compression step.
    """
    inv_freq = _spec(rope)[0].detach().to(device=device, dtype=torch.float32)
    return _angles(torch.arange(n_positions, device=device), inv_freq)


class AngleTables:
    """One :func:`angle_table` per distinct RoPE frequency set, built on first use.

    For one compression step: layers that share a rotary embedding (every layer of most models,
    each layer type of Gemma) share one table of positions ``0..n_positions-1`` on ``device``.
    """

    def __init__(self, n_positions: int, device: torch.device | str) -> None:
        self.n_positions, self.device = n_positions, device
        # id(inv_freq) -> (inv_freq, table); holding inv_freq keeps its id unique meanwhile
        self._tables: dict[int, tuple[Tensor, Tensor]] = {}

    def __call__(self, rope: object) -> Tensor:
        inv_freq = _spec(rope)[0]
        hit = self._tables.get(id(inv_freq))
        if hit is None:
            hit = (inv_freq, angle_table(rope, self.n_positions, self.device))
            self._tables[id(inv_freq)] = hit
        return hit[1]


def _spec(rope: object) -> tuple[Tensor, int, str, object]:
    """(inv_freq, rotary_dim, convention, rope_type) of a RopeSpec or a rotary embedding module."""
    inv_freq = getattr(rope, "inv_freq", None)
    if not isinstance(inv_freq, Tensor):
        raise ValueError(
            f"{type(rope).__name__} has no `inv_freq` tensor; pass the model adapter's "
            "RopeSpec (adapter.rope(layer)) or the model's rotary embedding module"
        )
    rotary_dim = getattr(rope, "rotary_dim", None) or 2 * inv_freq.numel()
    convention = getattr(rope, "convention", "rotate_half")
    rope_type = rope.rope_type if isinstance(getattr(rope, "rope_type", None), str) else None
    if rope_type is None:
        rope_type = _rope_type(rope)
    return inv_freq, int(rotary_dim), convention, rope_type


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, convention: str) -> Tensor:
    if convention == "interleaved":  # pairs (2i, 2i+1)
        pairs = x.unflatten(-1, (-1, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        c, s_ = cos[..., ::2], sin[..., ::2]
        return torch.stack((x1 * c - x2 * s_, x1 * s_ + x2 * c), dim=-1).flatten(-2)
    return apply_rope(x, cos, sin)


def rerotate_keys(
    keys: Tensor,
    old_positions: Tensor,
    new_positions: Tensor,
    rope: object,
    angles: Tensor | None = None,
) -> Tensor:
    """Move post-RoPE keys from ``old_positions`` to ``new_positions``.

    Args:
        keys: ``[batch, kv_heads, n, head_dim]`` keys already rotated at ``old_positions``.
        old_positions, new_positions: integer tensors of shape ``[n]`` (shared by all heads) or
            ``[kv_heads, n]`` (per head); deltas may be negative.
        rope: the layer's :class:`~kvpress_lab.adapters.RopeSpec` (``adapter.rope(layer)``), or
            a rotary embedding module with ``inv_freq`` (full rotary, rotate-half convention).
        angles: optional :func:`angle_table` of ``rope`` covering every old and new position, on
            the keys' device; its rows are looked up instead of recomputing the angles.

    Returns:
        Keys rotated by ``new - old``, in ``keys.dtype``. The module's ``attention_scaling``
        (yarn / longrope mscale) is already inside the keys and is not applied again: only a pure
        rotation is applied. With partial rotary only the first ``rotary_dim`` channels turn.

    The angles are formed from ``inv_freq`` exactly as transformers forms them (float32 product
    ``position * inv_freq``) for the old and the new positions, and their difference is taken in
    float64, so the result matches RoPE applied from scratch at the new positions up to float32
    rounding of cos/sin, even at positions in the 100k range. The rotation itself is computed in
    float32 whatever the keys' dtype. Equal old and new positions return the keys unchanged.

    Raises:
        ConfigError (a ValueError): dynamic rope types.
        ValueError: malformed shapes.
    """
    if keys.dim() != 4:
        raise ValueError(
            f"keys must be [batch, kv_heads, n, head_dim], got shape {list(keys.shape)}"
        )
    _, kv_heads, n, head_dim = keys.shape
    _check_positions("old_positions", old_positions, kv_heads, n)
    _check_positions("new_positions", new_positions, kv_heads, n)

    inv_freq, rotary_dim, convention, rope_type = _spec(rope)
    type_names = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
    if any(isinstance(t, str) and "dynamic" in t for t in type_names):
        raise ConfigError(
            f"key re-rotation does not support rope_type {rope_type!r}: dynamic RoPE recomputes "
            "its frequencies from the sequence length, so a rotation by a position delta is not "
            "exact. Disable re-rotation for this model or use a static rope type."
        )
    if rotary_dim > head_dim or rotary_dim != 2 * inv_freq.numel():
        raise ValueError(
            f"rotary dimension {rotary_dim} does not fit head_dim {head_dim} with "
            f"{inv_freq.numel()} frequencies"
        )

    device = keys.device
    inv_freq = inv_freq.detach().to(device=device, dtype=torch.float32)
    # float64 for the difference of the two float32 angles; MPS has no float64.
    diff_dtype = torch.float32 if device.type == "mps" else torch.float64
    if angles is not None:
        old_angles = angles[old_positions.to(device)]
        new_angles = angles[new_positions.to(device)]
    else:
        old_angles = _angles(old_positions.to(device), inv_freq)
        new_angles = _angles(new_positions.to(device), inv_freq)
    delta = new_angles.to(diff_dtype) - old_angles.to(diff_dtype)  # [n, d/2] or [kv_heads, n, d/2]
    if convention == "interleaved":
        delta = delta.repeat_interleave(2, dim=-1)
    else:
        delta = torch.cat((delta, delta), dim=-1)
    cos = delta.cos().to(torch.float32)
    sin = delta.sin().to(torch.float32)
    if cos.dim() == 2:  # shared by all heads
        cos, sin = cos[None, None], sin[None, None]
    else:
        cos, sin = cos[None], sin[None]
    k32 = keys.to(torch.float32)
    rotated = _rotate(k32[..., :rotary_dim], cos, sin, convention)
    if rotary_dim < head_dim:
        rotated = torch.cat((rotated, k32[..., rotary_dim:]), dim=-1)
    return rotated.to(keys.dtype)

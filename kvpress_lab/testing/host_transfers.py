"""Record host transfers and host reads of tensors, to keep them out of hot paths.

On a GPU, ``.cpu()``, ``.item()``, ``.tolist()``, ``bool(t)``/``int(t)`` and copies to the CPU
wait for every kernel queued before them. Inside per-layer or per-token code that serialises the
model's forward pass. :class:`HostTransferRecorder` records them wherever the tensors live, so a
test on a CPU-only machine sees the same calls a GPU would stall on:

- scalar reads (``item``, ``bool``, ``int``, ``float`` of a tensor): the dispatcher's
  ``aten._local_scalar_dense``, caught by a :class:`~torch.utils._python_dispatch.TorchDispatchMode`;
- ``Tensor.cpu``, ``Tensor.tolist`` and ``Tensor.numpy``: on a CPU tensor these return without
  reaching the dispatcher, so the recorder replaces the three methods while it is active;
- copies (``aten._to_copy``, ``aten.copy_``) from another device to the CPU.

``.to("cpu")`` of a tensor already on the CPU is a no-op that cannot be told apart from
``.to(x.device)``, so it is not recorded on CPU runs (on a GPU run it is, as ``aten._to_copy``).

```python
from kvpress_lab.testing.host_transfers import HostTransferRecorder

rec = HostTransferRecorder()
with rec:
    with rec.section("score"):
        scores = scorer.score(...)
assert not rec.events_in("score"), rec.report()
```
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator

import attrs
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostEvent", "HostTransferRecorder"]

_PATCHED = ("cpu", "tolist", "numpy")
_TRANSFERS = ("cpu", "tolist", "numpy", "to_cpu")


@attrs.frozen
class HostEvent:
    """One host read or transfer: ``kind`` is ``"scalar"``, ``"cpu"``, ``"tolist"``,
    ``"numpy"`` or ``"to_cpu"``; ``section`` the innermost open section (None outside any);
    ``where`` the caller's ``file:line``."""

    kind: str
    section: str | None
    where: str

    @property
    def is_transfer(self) -> bool:
        """A whole tensor copied to the host (not a single scalar read)."""
        return self.kind in _TRANSFERS


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename.replace("\\", "/")
        if "/torch/" in name or name.endswith("host_transfers.py"):
            continue
        return f"{name}:{frame.lineno}"
    return "?"


class HostTransferRecorder(TorchDispatchMode):
    """Records every host read and transfer while active; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[HostEvent] = []
        self._sections: list[str] = []
        self._saved: dict[str, object] = {}

    # sections -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Label the events recorded inside the ``with`` block (sections nest)."""
        self._sections.append(name)
        try:
            yield
        finally:
            self._sections.pop()

    def events_in(self, name: str, transfers_only: bool = False) -> list[HostEvent]:
        """Events recorded while section ``name`` was open (innermost)."""
        return [
            e for e in self.events if e.section == name and (e.is_transfer or not transfers_only)
        ]

    def report(self, events: list[HostEvent] | None = None) -> str:
        events = self.events if events is None else events
        return "\n".join(f"{e.kind} in {e.section}: {e.where}" for e in events) or "(none)"

    def _record(self, kind: str) -> None:
        section = self._sections[-1] if self._sections else None
        self.events.append(HostEvent(kind, section, _caller()))

    # dispatch -------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet is torch.ops.aten._local_scalar_dense:
            self._record("scalar")
        elif packet is torch.ops.aten._to_copy:
            src = args[0]
            dst = kwargs.get("device")
            if dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu":
                self._record("to_cpu")
        elif packet is torch.ops.aten.copy_:
            dst, src = args[0], args[1]
            if dst.device.type == "cpu" and src.device.type != "cpu":
                self._record("to_cpu")
        return func(*args, **kwargs)

    # the methods that bypass the dispatcher on CPU tensors ---------------------------------

    def __enter__(self) -> HostTransferRecorder:
        for name in _PATCHED:
            self._saved[name] = torch.Tensor.__dict__.get(name)
            original = getattr(torch.Tensor, name)

            def patched(tensor, *args, _original=original, _name=name, **kwargs):
                self._record(_name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, patched)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        try:
            return super().__exit__(*exc)
        finally:
            for name in _PATCHED:
                saved = self._saved.pop(name, None)
                if saved is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, saved)

"""Atomic checkpoint of a long pass's running state, so that a killed pass resumes where it stopped.

Why a running state and not chunk deltas: the K-FAC factor pass (``engine.attribution.curvature``) adds
one batch's covariance after another into float32 accumulators and draws the MC-Fisher's
sampled labels from one seeded generator.  Saving the accumulators *and* the generator's
state after every few batches, and restoring both on resume, makes a resumed pass do exactly
the arithmetic of an uninterrupted one: same adds in the same order, same random labels, so
the same bytes (given the same thread count; float reductions may otherwise differ in the
last bit).

One file per pass, ``<store base>/.resume-<name>-<settings digest>.pt``, written to a
temporary name, fsynced and renamed over the previous one (``os.replace``): a ``kill -9`` at
any moment leaves either the previous checkpoint or the new one, never a torn file.  The
state also carries a ``signature`` (everything the pass depends on: rows, batch size, seed,
...); a checkpoint with another signature is ignored, never mixed in.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .store import canonical, settings_digest


class PassCheckpoint:
    """Save / load / clear one pass's state dict (tensors, numbers, generator states) atomically."""

    def __init__(self, path: str | Path, signature: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.signature = canonical(signature or {})

    @classmethod
    def for_store(cls, store: Any, name: str, settings: Mapping[str, Any]) -> PassCheckpoint:
        """The checkpoint of artefact ``name`` built with ``settings`` in ``store`` (engine.attribution.store.Store)."""
        return cls(Path(store.base) / f".resume-{name}-{settings_digest(settings)}.pt")

    def with_signature(self, signature: Mapping[str, Any]) -> PassCheckpoint:
        return PassCheckpoint(self.path, signature)

    def part(self, name: str) -> PassCheckpoint:
        """The checkpoint of a later pass of the same job (same signature, its own file), e.g.
        EK-FAC's correction pass after the factor pass; ``clear()`` removes the parts too."""
        if not name.isidentifier():
            raise ValueError(f"bad checkpoint part name {name!r}")
        out = PassCheckpoint(self.path.with_name(f"{self.path.stem}.{name}{self.path.suffix}"))
        out.signature = self.signature
        return out

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none, it is unreadable or its signature differs."""
        if not self.path.is_file():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)  # no unpickling of code
        except Exception:  # noqa: BLE001 - a damaged checkpoint only costs the work since the last one
            return None
        if not isinstance(blob, dict) or blob.get("signature") != self.signature:
            return None
        return blob.get("state")

    def save(self, state: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save({"signature": self.signature, "state": dict(state)}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def clear(self) -> None:
        """Remove this checkpoint and its parts (``part``)."""
        for path in [self.path, *self.path.parent.glob(f"{self.path.stem}.*{self.path.suffix}")]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

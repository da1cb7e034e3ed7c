"""Study B, Section 3: the toy network behind the subspace-patching illusion (Makelov et al. 2023).

A linear network with three hidden units (:class:`ToyModel`) reads a binary feature ``x``. One
unit tracks ``x`` but writes nothing (causally disconnected), one writes but never varies
(dormant), one tracks ``x`` and writes (faithful). Patching the direction ``v ∝ e1 + e2`` from the
source input into the base input changes the output as much as patching the faithful unit,
although neither of its parts does anything alone: ``v``'s null-space part (against the out
projection's row space) moves the activation along the dormant row-space part by the amount the
data vary along the disconnected unit (:func:`toy_example`). :func:`toy_record` adds the weights,
hidden states, directions and patched states the figure draws.

The numbers are computed with the generic subspace maths of :mod:`mechrepro.core.subspace`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mechrepro.core import subspace as S


@dataclass
class ToyModel:
    """A linear network ``x ↦ h = x·w_in ↦ z = h @ W_out ↦ y = z · r`` with 3 hidden units.

    ``x ∈ {+1, −1}`` is the binary feature. ``h1 = x`` tracks it but writes nothing
    (``W_out[0] = 0``: causally disconnected); ``h2 = 0`` on every input (dormant) but writes
    ``(2, 0)``; ``h3 = x`` is the faithful unit and writes ``(0, 1)``. The readout ``r = (1, 1)``
    gives ``y = w · h`` with ``w = W_out r = (0, 2, 1)``.

    The "MLP out projection" ``W_out [3, 2]`` has rank 2: its row space is ``span(e2, e3)`` and
    its kernel ``span(e1)``, as in a transformer MLP whose hidden width exceeds ``d_model``.
    (Against the 1-D end-to-end readout ``w`` instead, the row part of any ``v`` is ``∝ w``, and
    patching along ``w`` copies ``y`` itself, so that split cannot show the illusion;
    :func:`toy_example` reports it as ``v_row_readout``.)
    """

    w_in: Tensor = field(default_factory=lambda: torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    W_out: Tensor = field(default_factory=lambda: torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]],
                                                               dtype=torch.float64))
    r: Tensor = field(default_factory=lambda: torch.tensor([1.0, 1.0], dtype=torch.float64))

    def hidden(self, x: Tensor) -> Tensor:
        return x[..., None] * self.w_in

    def output(self, h: Tensor) -> Tensor:
        return (h @ self.W_out) @ self.r


def toy_example(model: ToyModel | None = None, x_base: float = 1.0, x_src: float = -1.0) -> dict[str, float]:
    """Output change ``y(patched) − y(base)`` of patches from the source input into the base input.

    Keys: ``full`` (all units), ``e3`` (faithful unit), ``v`` (``∝ e1 + e2``), ``v_null`` and
    ``v_row`` (its parts against the row space of ``W_out``), ``v_row_readout`` (its row part
    against the 1-D readout ``w``), and ``y_base``, ``y_src``. Everything is computed with
    :func:`~mechrepro.core.subspace.subspace_patch`, :func:`~mechrepro.core.subspace.rowspace_basis` and
    :func:`~mechrepro.core.subspace.decompose`.
    """
    m = model or ToyModel()
    h_b, h_s = m.hidden(torch.tensor(x_base, dtype=torch.float64)), m.hidden(torch.tensor(x_src, dtype=torch.float64))
    y_b = m.output(h_b)
    eye = torch.eye(3, dtype=torch.float64)
    v = S.unit(eye[0] + eye[1])
    v_row, v_null = S.decompose(v, S.rowspace_basis(m.W_out))
    w = m.W_out @ m.r
    v_row_w, _ = S.decompose(v, S.rowspace_basis(w[:, None]))

    def effect(direction: Tensor) -> float:
        return float(m.output(S.subspace_patch(h_b, h_s, direction)) - y_b)

    return {"y_base": float(y_b), "y_src": float(m.output(h_s)), "full": float(m.output(h_s) - y_b),
            "e3": effect(eye[2]), "v": effect(v), "v_null": effect(S.unit(v_null)), "v_row": effect(S.unit(v_row)),
            "v_row_readout": effect(S.unit(v_row_w)),
            "v_null_norm": float(v_null.norm()), "v_row_norm": float(v_row.norm())}


def toy_record(model: ToyModel | None = None) -> dict:
    """:func:`toy_example` with the weights, hidden states, directions and patched hidden states of
    the base input ``x = 1`` and the source input ``x = −1`` (``toy.json``'s ``toy``)."""
    m = model or ToyModel()
    effects = toy_example(m)
    eye = torch.eye(3, dtype=torch.float64)
    v = S.unit(eye[0] + eye[1])
    v_row, v_null = S.decompose(v, S.rowspace_basis(m.W_out))
    h_b, h_s = m.hidden(torch.tensor(1.0, dtype=torch.float64)), m.hidden(torch.tensor(-1.0, dtype=torch.float64))
    dirs = {"e3": eye[2], "v": v, "v_null": S.unit(v_null), "v_row": S.unit(v_row)}
    return {**effects,
            "weights": {"w_in": m.w_in.tolist(), "W_out": m.W_out.tolist(), "r": m.r.tolist(),
                        "readout_w": (m.W_out @ m.r).tolist()},
            "x_base": 1.0, "x_src": -1.0, "h_base": h_b.tolist(), "h_src": h_s.tolist(),
            "directions": {k: d.tolist() for k, d in dirs.items()},
            "h_patched": {k: S.subspace_patch(h_b, h_s, d).tolist() for k, d in dirs.items()}}

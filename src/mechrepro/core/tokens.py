"""Token batches: prompts of different lengths as one right-padded tensor.

Every study runs batches of prompts of different lengths. They are *right*-padded: row ``i``
holds its tokens at positions ``0 … len_i − 1`` and ``pad_id`` after them. Attention is causal,
so the padding after a row's last token never changes what that token sees; the studies read
each row at its own positions (e.g. its END) and never at the padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def pad(token_lists: Sequence[Sequence[int]], pad_id: int, width: int | None = None) -> Tensor:
    """Right-padded ``[n, width]`` long tensor of ``token_lists`` (``width``: default the longest)."""
    width = max((len(t) for t in token_lists), default=0) if width is None else width
    out = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    for i, t in enumerate(token_lists):
        if len(t) > width:
            raise ValueError(f"row {i} has {len(t)} tokens, more than the batch width {width}")
        out[i, :len(t)] = torch.tensor(list(t), dtype=torch.long)
    return out


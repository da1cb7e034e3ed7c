"""Right-padded token batches (mechrepro.core.tokens)."""

from __future__ import annotations

import pytest
import torch

from mechrepro.core.tokens import pad


def test_pad_right_pads_to_the_longest_or_a_given_width():
    out = pad([[5, 6, 7], [8], []], pad_id=0)
    assert out.dtype == torch.long
    assert out.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert pad([(1, 2)], 9, width=4).tolist() == [[1, 2, 9, 9]]
    assert pad([], 0).shape == (0, 0)
    with pytest.raises(ValueError, match="row 1 has 3 tokens, more than the batch width 2"):
        pad([[1], [1, 2, 3]], 0, width=2)

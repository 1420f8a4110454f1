"""The one pooling shared by task heads and measurement: each mode on a right-padded batch, by hand."""

from __future__ import annotations

import pytest
import torch

from locality.core.pooling import pool


def test_each_mode_reads_the_right_tokens():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # right padding: lengths 3 and 2
    torch.testing.assert_close(pool(hidden, mask, "first"), hidden[:, 0])
    torch.testing.assert_close(pool(hidden, mask, "last"), torch.stack([hidden[0, 2], hidden[1, 1]]))
    torch.testing.assert_close(
        pool(hidden, mask, "mean"), torch.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)])
    )
    positions = torch.tensor([[0, 2], [1, 0], [1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "tokens", positions), hidden[[0, 1, 1], [2, 0, 1]])
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool(hidden, mask, "tokens")  # tokens needs positions

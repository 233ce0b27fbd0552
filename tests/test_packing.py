"""Sequence packing as pure functions: placement at simulated scale, the index maps, the attention mask."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.models.packing import Packing, first_fit_decreasing

pytestmark = pytest.mark.numeric


@pytest.mark.parametrize("width, mean", [(77, 18.0), (32, 8.0), (16, 8.0)])
def test_first_fit_decreasing_places_every_caption_once_without_overlap_in_few_rows(width, mean):
    """10,000 captions with web-like lengths (geometric around `mean`, 3 tokens at least: <start> word <end>)."""
    lengths = np.clip(np.random.default_rng(0).geometric(1 / mean, 10_000) + 2, 3, width).tolist()
    row, start, rows = first_fit_decreasing(lengths, width)
    used = np.zeros((rows, width), dtype=int)
    for r, s, n in zip(row, start, lengths):
        assert 0 <= r < rows and 0 <= s and s + n <= width
        used[r, s:s + n] += 1
    assert used.max() == 1 and used.sum() == sum(lengths)
    lower = math.ceil(sum(lengths) / width)                     # no packing beats full rows
    assert rows <= 11 / 9 * lower + 1                           # FFD's worst-case factor, even against full rows
    assert rows < len(lengths)                                   # and it does share rows


def test_first_fit_decreasing_names_a_caption_longer_than_a_row():
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens; a row holds 0 to 8"):
        first_fit_decreasing([3, 9, 2], 8)


def test_pack_then_unpack_restores_each_caption_and_zeros_its_padding():
    lengths = torch.tensor([3, 7, 1, 5, 4])
    x = torch.randn(5, 7, 2)
    packing = Packing.of(lengths, 7, 8)
    assert packing.rows == 3                                     # 20 tokens in rows of 8: 7|1, 5|3, 4
    packed = packing.pack(x, fill=-1.0)
    real = torch.arange(7)[None, :] < lengths[:, None]           # [B, L]
    assert (packed == -1.0).all(-1).sum() == 3 * 8 - 20          # the padding slots
    restored = packing.unpack(packed, (5, 7))
    assert torch.equal(restored[real], x[real]) and (restored[~real] == 0).all()
    # each slot's position restarts at 0 within its caption
    assert sorted(packing.position[packing.segment < 5].tolist()) == sorted(j for n in lengths.tolist()
                                                                          for j in range(n))


def test_packed_attention_stays_within_each_caption_causally_unless_bidirectional():
    lengths = torch.tensor([3, 2, 2])
    packing = Packing.of(lengths, 3, 8)                          # one row: 3 + 2 + 2 tokens and one padding slot
    allowed = packing.allowed(torch.tensor([False, True, False]))[0]  # [S, S]
    seg, pos = packing.segment, packing.position
    for q in range(8):
        for k in range(8):
            same = seg[q] == seg[k]
            if seg[q] >= 3:                                      # padding: itself only
                expected = q == k
            elif seg[q] == 1:                                    # the bidirectional caption: all of itself
                expected = bool(same)
            else:
                expected = bool(same and pos[k] <= pos[q])
            assert bool(allowed[q, k]) == expected, (q, k)
    assert allowed.any(-1).all()                                 # no row fully masked (softmax stays finite)

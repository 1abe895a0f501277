"""One map instead of one per prompt, where the same prompts decide: ``render``'s CPU shortcut.

Each output pixel is a bilinear mix of one cell of the logits (its four corners), with the same
weights for every prompt. Where the same prompts are picked at all four corners (the largest
positive, the smallest negated negative, and the smaller of those two) they are the picks
everywhere inside the cell: a mix of values that are each at least (or at most) another prompt's
is too. There the mask is the mix of the combined logits, the very values the prompt-by-prompt
path would mix, so one map is resized instead of one per prompt, and no max or min is taken at
full size. The cells where prompts cross (about 2% of them on smooth logits) are computed prompt
by prompt, at their pixels only. A cell whose four corners all lie below the output's floor (a
logit under which the raw mask rounds to 0 and the thresholded mask stays unset) gives the same
pixels whichever prompt decides, so it never counts as crossing: a background where the prompts'
low scores take turns costs nothing.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

#: Above this share of crossing cells the shortcut costs more than it saves (each crossing pixel
#: costs about 40 ns, ten times a pixel of the one map; bench/bench_dominant.py at 12 MP, both
#: masks, 3 + 1 prompts: faster at 2% and 4% crossing, slower from 6%): ``render`` goes prompt by
#: prompt everywhere, as on noisy logits (a random model's cross at 98%), having spent about 2 ms
#: finding out.
MAX_CROSSING = 0.03


class Dominant:
    """``combined``: the combined logits, to resize in place of every prompt's; ``pays``: whether
    to (few enough cells cross); ``fix``: writes the crossing cells' pixels.

    ``signed``: (prompts, h, w) logits, negatives negated, positives first; ``source_rows``,
    ``source_cols``: ``(first, weight)`` of the output rows and columns, as ``render`` computes
    them; ``floor``: a logit below which every mask value gives the same pixels (``None``: none).
    """

    def __init__(self, signed: torch.Tensor, positives: int, source_rows, source_cols,
                 floor: float | None = None):
        highest = signed[:positives].amax(0)
        # Which prompts are picked, as bits: the positives equal to the largest, whether a negative
        # is smaller, the negatives equal to the smallest (ties only make more cells cross).
        pick = _equal_bits(signed[:positives], highest)
        self.combined = highest
        if positives < signed.shape[0]:
            lowest = signed[positives:].amin(0)
            take = lowest < highest
            self.combined = torch.where(take, lowest, highest)
            pick.add_(take, alpha=1 << positives)
            pick.add_(_equal_bits(signed[positives:], lowest), alpha=1 << (positives + 1))
        crossing = _any_corner(pick, torch.ne)
        if floor is not None:  # cells below the floor at every corner give the same pixels either way
            low = highest < floor
            crossing &= ~low | _any_corner(low, lambda _, other: ~other)
        self.share = float(crossing.float().mean())
        self.pays = self.share <= MAX_CROSSING
        if self.pays:
            self._fixes(signed, positives, crossing, source_rows, source_cols)

    def _fixes(self, signed, positives, crossing, source_rows, source_cols) -> None:
        """The crossing cells' pixels, row by row (``self.y``, ``self.x``), and their values."""
        height, width = signed.shape[1:]
        row_start, row_count = _spans(source_rows[0], height)
        col_start, col_count = _spans(source_cols[0], width)
        cell_row, cell_col = crossing.nonzero(as_tuple=True)  # row-major: by cell row, then column
        # The output columns of each cell row's crossing cells, one after another
        widths = col_count.index_select(0, cell_col)
        columns = _expand(col_start.index_select(0, cell_col), widths)
        width_per_row = torch.zeros(height, dtype=torch.long).index_add_(0, cell_row, widths)
        offset_per_row = width_per_row.cumsum(0) - width_per_row
        # Every output row of each such cell row takes all of them: (y, x) in row-major order
        rows = width_per_row.nonzero()[:, 0]
        lines = row_count.index_select(0, rows)
        line_y = _expand(row_start.index_select(0, rows), lines)
        line_row = torch.repeat_interleave(rows, lines)
        per_line = width_per_row.index_select(0, line_row)
        self.y = torch.repeat_interleave(line_y, per_line)
        self.x = columns.index_select(0, _expand(offset_per_row.index_select(0, line_row), per_line))
        grid = torch.stack([_normalized(source_cols, width).index_select(0, self.x),
                            _normalized(source_rows, height).index_select(0, self.y)], -1)
        exact = F.grid_sample(signed[None], grid[None, None], mode="bilinear", padding_mode="border",
                              align_corners=False)[0, :, 0]
        value = exact[:positives].amax(0)
        if positives < signed.shape[0]:
            value = torch.minimum(value, exact[positives:].amin(0))
        self.value = value

    def fix(self, out: torch.Tensor, start: int, stop: int) -> None:
        """Write the crossing pixels of output rows start..stop into ``out`` (those rows' mask)."""
        first, last = torch.searchsorted(self.y, torch.tensor([start, stop])).tolist()
        if last > first:
            out.index_put_((self.y[first:last] - start, self.x[first:last]), self.value[first:last])


def _any_corner(values: torch.Tensor, test) -> torch.Tensor:
    """Per cell (top-left corner ``values[r, c]``; past the last row or column the corner repeats):
    whether ``test(corner, other)`` holds for any of its other three corners."""
    result = torch.zeros(values.shape, dtype=torch.bool)
    result[:-1] |= test(values[:-1], values[1:])
    result[:, :-1] |= test(values[:, :-1], values[:, 1:])
    result[:-1, :-1] |= test(values[:-1, :-1], values[1:, 1:])
    return result


def _equal_bits(values: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Bit i set where ``values[i]`` equals ``top``."""
    bits = torch.zeros(top.shape, dtype=torch.long)
    for index, value in enumerate(values):
        bits.add_(value == top, alpha=1 << index)
    return bits


def _spans(first: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each source index, the first output index that uses it as its first source, and how many."""
    count = torch.bincount(first, minlength=side)
    return count.cumsum(0) - count, count


def _expand(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``cat(arange(s, s + n) for s, n in zip(starts, counts))``."""
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
    return (starts - counts.cumsum(0) + counts).index_select(0, owner).add_(torch.arange(len(owner)))


def _normalized(source, side: int) -> torch.Tensor:
    """grid_sample's coordinate (align_corners=False) of each output's source position (``first +
    weight``, exact in float32, as ``render`` computed it)."""
    first, weight = source
    return (first.float() + weight.reshape(-1)).mul_(2).add_(1).div_(side).sub_(1)

"""The vocab-parallel computation on one process: a backend's partial per column range, the
tables merged with _stats.merge_all (in `order` when given), the mixture's sums of every
range given the merged statistics, _stats.finish. Shared by the backends' range tests."""

import torch

from kdkernels import _stats
from kdkernels._spec import TWO_PASS_KINDS


def over_ranges(backend, s, t, labels, spec, ranges, order=None):
    """(row losses, finished statistics, the summed (N, 4) pass-2 sums of a two-pass kind
    or None)."""
    cols = [(s[:, a:b].contiguous(), t[:, a:b].contiguous(), a) for a, b in ranges]
    parts = torch.stack([backend.partial(sc, tc, labels, spec, a) for sc, tc, a in cols])
    if order is not None:
        parts = parts[list(order)]
    stats = _stats.merge_all(parts, spec)
    sums = None
    if spec.div.kind in TWO_PASS_KINDS:
        sums = sum(backend.mix_partial(sc, tc, spec, stats, a) for sc, tc, a in cols)
    loss, finished = _stats.finish(stats, labels, spec, sums)
    return loss, finished, sums

"""The row-statistics interface (kdkernels/_stats.py) on the reference backend: partials of
column ranges merge exactly into the whole row's, in any order, with -inf and +inf
accumulators, and finish gives the losses of kd_loss. The other backends' partials are
checked against these in their own test files and through the vocab-parallel tests."""

import math

import pytest
import torch
from _formulas import kd_loss
from _ranges import over_ranges

from kdkernels import _stats, reference
from kdkernels._spec import Divergence, LossSpec
from kdkernels._stats import NCOL, Col

SPECS = {
    "forward_kl": Divergence("forward_kl"),
    "reverse_kl": Divergence("reverse_kl"),
    "jsd": Divergence.from_user("jsd", 0.3, 0.0),
    "skew_forward_kl": Divergence.from_user("skew_forward_kl", 0.0, 0.2),
    "soft_cross_entropy": Divergence("soft_cross_entropy"),
    "tvd": Divergence("tvd"),
    "forward_reverse_kl": Divergence.from_user("forward_reverse_kl", 0.0, 0.0, alpha=0.3),
    "alpha_beta": Divergence.from_user("alpha_beta", 0.0, 0.0, ab_alpha=0.3, ab_beta=0.8),
}
# column ranges of a 37-wide row, with an empty one
SPLITS = ((0, 10), (10, 10), (10, 25), (25, 37))


def spec_of(name, inv_ts=1.0, ce_weight=0.5):
    return LossSpec(SPECS[name], inv_ts=inv_ts, inv_tt=1.0 / 1.5, kd_scale=1.3,
                    ce_weight=ce_weight, ignore_index=-100)


def split_forward(s, t, labels, spec, ranges, order=None):
    """Losses and statistics of whole rows from the partials of `ranges`, merged in
    `order`: what the vocab-parallel path computes."""
    return over_ranges(reference, s, t, labels, spec, ranges, order)[:2]


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("inv_ts", [1.0, 0.5], ids=["T1", "T2"])
def test_split_equals_whole(name, inv_ts):
    """Losses, statistics and gradients from ranges equal the whole row's (float64)."""
    spec = spec_of(name, inv_ts)
    s, t = torch.randn(6, 37, dtype=torch.float64) * 3, torch.randn(6, 37, dtype=torch.float64)
    labels = torch.tensor([0, 9, 10, 36, -100, 24])
    loss, stats = reference.forward_stats(s, t, labels, spec)
    for order in (None, (3, 1, 0, 2)):
        got, got_stats = split_forward(s, t, labels, spec, SPLITS, order)
        torch.testing.assert_close(got, loss, rtol=1e-12, atol=1e-12)
        keep = [c for c in range(NCOL) if c != Col.ACC]  # ACC is relative to the maxima
        torch.testing.assert_close(got_stats[:, keep], stats[:, keep], rtol=1e-12, atol=1e-12)
    g = torch.randn(6, dtype=torch.float64)
    whole = reference.grads(s, t, labels, spec, stats, 0, g, True)
    parts = [reference.grads(s[:, a:b], t[:, a:b], labels, spec, stats, a, g, True)
             for a, b in SPLITS]
    for i in range(2):
        torch.testing.assert_close(torch.cat([p[i] for p in parts], 1), whole[i])


@pytest.mark.parametrize("name", list(SPECS))
def test_finish_matches_formula(name):
    spec = spec_of(name)
    s, t = torch.randn(5, 37, dtype=torch.float64), torch.randn(5, 37, dtype=torch.float64)
    labels = torch.tensor([3, -100, 0, 36, 17])
    loss, _ = reference.forward_stats(s, t, labels, spec)
    div = {"skew_forward_kl": dict(skew=0.2), "jsd": dict(beta=0.3),
           "forward_reverse_kl": dict(alpha=0.3),
           "alpha_beta": dict(ab_alpha=0.3, ab_beta=0.8)}.get(name, {})
    want = kd_loss(s, t, labels, divergence=name, temperature=1.0, teacher_temperature=1.5,
                   temperature_scale=False, kd_weight=1.3, ce_weight=0.5, reduction="none",
                   **div)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)


def test_empty_range_is_the_identity():
    spec = spec_of("forward_kl")
    s, t = torch.randn(3, 8), torch.randn(3, 8)
    labels = torch.tensor([1, 2, 3])
    whole = reference.partial(s, t, labels, spec)
    empty = reference.partial(s[:, :0], t[:, :0], labels, spec, 8)
    torch.testing.assert_close(empty, _stats.empty(3, s.device, s.dtype))
    for a, b in ((whole, empty), (empty, whole)):
        torch.testing.assert_close(_stats.merge(a, b, spec), whole)


@pytest.mark.parametrize("reverse", [False, True], ids=["inf-first", "inf-last"])
def test_infinite_accumulator_under_a_larger_maximum(reverse):
    """A student logit of -inf where the teacher is finite makes its range's forward-KL
    accumulator +inf; when another range's teacher maximum is 200 higher, that range's
    teacher mass underflows to 0 (as in the unsplit softmax) and it contributes 0: finite,
    never 0 * inf = nan, in either order."""
    v = 8192
    s, t = torch.zeros(1, v), torch.zeros(1, v)
    s[0, 5000] = -math.inf
    t[0, 0] = 200.0
    if reverse:
        s, t = s.flip(1), t.flip(1)
    spec = spec_of("forward_kl", ce_weight=0.0)
    # the unsplit float32 row: p = e^-200 / Z underflows to 0 there (float64 keeps it, +inf)
    want, _ = reference.forward_stats(s, t, None, spec)
    assert torch.isfinite(want).all()
    ranges = [(a, a + 1024) for a in range(0, v, 1024)]
    parts = [reference.partial(s[:, a:b], t[:, a:b], None, spec, a) for a, b in ranges]
    assert any(p[0, Col.ACC] == math.inf for p in parts)
    for order in (ranges, ranges[::-1]):
        idx = [ranges.index(r) for r in order]
        got, _ = _stats.finish(_stats.merge_all(torch.stack([parts[i] for i in idx]), spec),
                               None, spec)
        assert torch.isfinite(got).all(), got
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_nan_accumulator_stays_nan():
    spec = spec_of("forward_kl", ce_weight=0.0)
    s, t = torch.randn(1, 16), torch.randn(1, 16)
    t[0, 3] = math.nan
    a = reference.partial(s[:, :8], t[:, :8], None, spec)
    b = reference.partial(s[:, 8:], t[:, 8:], None, spec, 8)
    loss, _ = _stats.finish(_stats.merge(a, b, spec), None, spec)
    assert loss.isnan().all()


NON_FINITE = ("nan-student", "posinf-teacher", "all-neginf-student", "all-neginf-teacher")


def _non_finite_row(case):
    """(s, t, which row holds the case) of 3 rows of width 37; the case is in row 1."""
    s, t = torch.randn(3, 37), torch.randn(3, 37)
    if case == "nan-student":
        s[1, 30] = math.nan
    elif case == "posinf-teacher":
        t[1, 12] = math.inf
    elif case == "all-neginf-student":
        s[1] = -math.inf
    else:
        t[1] = -math.inf
    return s, t


@pytest.mark.parametrize("case", NON_FINITE)
@pytest.mark.parametrize("name", list(SPECS))
def test_non_finite_row_through_ranges_is_nan(name, case):
    """The maxima carry a NaN or a +inf logit, and -inf (nothing finite) through partials and
    merges in any order; finish makes that row NaN, an ignored one 0, and leaves the others."""
    spec = spec_of(name)
    s, t = _non_finite_row(case)
    for labels, want_row in ((torch.tensor([3, 20, 36]), None), (torch.tensor([3, -100, 36]), 0)):
        for order in (None, (3, 1, 0, 2)):
            got, _ = split_forward(s, t, labels, spec, SPLITS, order)
            if want_row is None:
                assert got[1].isnan(), got
            else:
                assert got[1] == 0, got
            want, _ = reference.forward_stats(s[[0, 2]], t[[0, 2]], labels[[0, 2]], spec)
            torch.testing.assert_close(got[[0, 2]], want)


def test_finish_of_non_finite_maxima():
    """finish decides from the merged maxima alone: NaN, +inf or -inf (no finite logit) on
    either side gives NaN whatever the other columns say."""
    spec = spec_of("forward_kl", ce_weight=0.0)
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    stats = reference.partial(s, t, None, spec)
    stats[0, Col.MS] = math.nan
    stats[1, Col.MT] = math.inf
    stats[2, Col.MS] = -math.inf
    loss, _ = _stats.finish(stats, None, spec)
    assert loss[:3].isnan().all() and torch.isfinite(loss[3])

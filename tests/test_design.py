"""The coalition design and the shard-additive statistics, without any model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shapfleet.errors import EstimationError, InvalidSettingsError, PipelineError
from shapfleet.workers.engine.design import (
    CoalitionDesign,
    default_nsamples,
    sampling_weights,
    size_distribution,
)
from shapfleet.workers.engine.estimation import (
    ShardStatistics,
    combine,
    solve_constrained,
)


def all_rows(design: CoalitionDesign, n_shards: int = 1):
    rows = []
    for shard in design.shard_units(n_shards):
        for unit in shard:
            z, w = design.coalitions(unit)
            rows.append((unit.kind, z, w))
    return rows


def test_full_budget_enumerates_every_coalition_once_with_kernel_weights():
    design = CoalitionDesign.create(6, 10_000, seed=0)
    assert design.is_exact and design.n_pairs == 0
    z = np.concatenate([z for _, z, _ in all_rows(design)])
    w = np.concatenate([w for _, _, w in all_rows(design)])
    assert len(z) == 2 ** 6 - 2 == len({tuple(r) for r in z})
    # p(z) = q(|z|) / C(M, |z|) sums to one over 0 < |z| < M.
    q = size_distribution(6)
    np.testing.assert_allclose(w, [q[r.sum()] / math.comb(6, r.sum()) for r in z])
    assert w.sum() == pytest.approx(1.0)


def test_partial_budget_enumerates_outer_sizes_then_samples_complementary_pairs():
    design = CoalitionDesign.create(12, 600, seed=1)
    assert design.enumerated_sizes == (1, 11, 2, 10)
    assert design.n_enumerated == 2 * 12 + 2 * 66
    assert design.n_coalitions <= 600 and design.n_coalitions >= 599
    for kind, z, _ in all_rows(design):
        if kind == "sampled":
            assert np.all(z[0::2] == ~z[1::2])  # complementary pairs
            assert set(z.sum(axis=1)) <= set(range(3, 10))
    # Enumerated mass plus sampled mass is the whole distribution.
    enumerated = sum(w.sum() for kind, _, w in all_rows(design) if kind == "enumerated")
    assert enumerated + design.sampled_mass == pytest.approx(1.0)


def test_coalitions_do_not_depend_on_the_shard_count():
    design = CoalitionDesign.create(20, 3000, seed=7)
    reference = np.concatenate([z for _, z, _ in all_rows(design, 1)])
    for n in (2, 3, 8, 1000):
        shards = design.shard_units(n)
        assert len(shards) == min(n, len(design.units)) and all(shards)
        np.testing.assert_array_equal(np.concatenate([z for _, z, _ in all_rows(design, n)]), reference)


def test_sampled_sizes_are_uniform_and_weigh_back_to_the_kernel():
    """Sizes are drawn uniformly; the importance weights w(s) share / N_S give each size the
    kernel's mass q(s), outside the enumerated sizes (here 1 and 9)."""
    design = CoalitionDesign(10, 3, (), 0, 20_000, 20_000)  # nothing enumerated: every size is sampled
    sizes = np.concatenate([z.sum(axis=1) for _, z, _ in all_rows(design)])
    np.testing.assert_allclose(np.bincount(sizes, minlength=11)[1:10] / len(sizes), 1 / 9, atol=0.01)
    mass = np.bincount(sizes, weights=sampling_weights(10, sizes), minlength=11) * design.sampled_share / len(sizes)
    np.testing.assert_allclose(mass, size_distribution(10), atol=0.01)
    outer = (1, 9)  # enumerated, as a budget of 20 + 2 * 20,000 would not: the outer pair alone
    raw = CoalitionDesign(10, 2, outer, 20, 20_000, 0)._raw_pairs_needed()
    partial = CoalitionDesign(10, 2, outer, 20, 20_000, raw)
    sizes = np.concatenate([z.sum(axis=1) for kind, z, _ in all_rows(partial) if kind == "sampled"])
    mass = np.bincount(sizes, weights=sampling_weights(10, sizes), minlength=11) * partial.sampled_share / len(sizes)
    expected = size_distribution(10).copy()
    expected[[1, 9]] = 0
    np.testing.assert_allclose(mass, expected, atol=0.015)
    assert mass.sum() == pytest.approx(partial.sampled_mass, abs=0.02)


def test_a_design_stored_with_another_size_law_is_refused():
    """A plan made before sizes were drawn uniformly (its design has no ``size_law``) would be
    finished with other coalitions and weights than it started with: it is refused instead."""
    design = CoalitionDesign.create(12, 600, seed=5)
    stored = design.to_dict()
    assert stored["size_law"] == "uniform" and CoalitionDesign.from_dict(stored) == design
    earlier = {key: value for key, value in stored.items() if key != "size_law"}
    with pytest.raises(PipelineError, match="submit the job again"):
        CoalitionDesign.from_dict(earlier)


def test_sample_blocks_are_the_documented_random_stream():
    """Raw block j is drawn from default_rng(SeedSequence(seed, spawn_key=(j,))): its 64 sizes
    uniform over 1..M-1 (Generator.integers), then a uniform subset of each size (the smallest
    random keys); pairs of enumerated sizes are skipped. A seeded job's coalitions are fixed by this."""
    design = CoalitionDesign.create(12, 600, seed=5)
    kept_total = 0
    for unit in design.units:
        if unit.kind != "sampled":
            continue
        rng = np.random.default_rng(np.random.SeedSequence(5, spawn_key=(unit.block,)))
        sizes = rng.integers(1, 12, size=64)
        ranks = np.argsort(np.argsort(rng.random((64, 12)), axis=1), axis=1)
        rows = np.arange(unit.start, unit.stop) - 64 * unit.block
        rows = rows[~np.isin(sizes[rows], design.enumerated_sizes)]
        z, pairs = design.coalitions(unit)
        np.testing.assert_array_equal(z[0::2], ranks[rows] < sizes[rows, None])
        np.testing.assert_array_equal(z[1::2], ranks[rows] >= sizes[rows, None])
        np.testing.assert_array_equal(pairs[0::2], 64 * unit.block + rows)
        kept_total += len(rows)
    assert kept_total == design.n_pairs


def test_a_larger_budget_contains_a_smaller_ones_design():
    """Nested designs: what a budget adds to a smaller one (new enumerated sizes, further raw
    pairs), with the rows of newly enumerated sizes and those past its raw positions dropped, is
    the larger budget's design, row for row."""
    for m, budgets in ((12, (300, 600, 1500)), (49, (256, 700, 2000)), (20, (100, 3000, 40_000))):
        earlier, rows = None, []
        for budget in budgets:
            design = CoalitionDesign.create(m, budget, seed=4)
            for unit in design.new_units(earlier):
                z, extra = design.coalitions(unit)
                rows.append((unit.kind, z, extra))
            earlier = design
            enumerated = np.concatenate([z for kind, z, _ in rows if kind == "enumerated"] or [np.zeros((0, m), bool)])
            z_s = np.concatenate([z for kind, z, _ in rows if kind == "sampled"] or [np.zeros((0, m), bool)])
            pairs = np.concatenate([p for kind, _, p in rows if kind == "sampled"] or [np.zeros(0, np.int64)])
            keep = design.keeps(pairs, z_s.sum(axis=1))
            expected = all_rows(design)
            np.testing.assert_array_equal(enumerated, np.concatenate(
                [z for kind, z, _ in expected if kind == "enumerated"] or [np.zeros((0, m), bool)]))
            np.testing.assert_array_equal(z_s[keep], np.concatenate(
                [z for kind, z, _ in expected if kind == "sampled"] or [np.zeros((0, m), bool)]))
            assert keep.sum() == design.n_sampled


def test_budget_checks():
    assert default_nsamples(50) == 2148
    with pytest.raises(InvalidSettingsError, match="too small"):
        CoalitionDesign.create(50, 40, seed=0)
    assert CoalitionDesign.create(3, 7, seed=0).is_exact  # tiny games are enumerated whatever is asked
    assert CoalitionDesign.from_dict(CoalitionDesign.create(30, 500, 2).to_dict()) == CoalitionDesign.create(30, 500, 2)


def test_solve_constrained_meets_the_constraint_and_the_normal_equations():
    rng = np.random.default_rng(0)
    root = rng.normal(size=(6, 6))
    a = root @ root.T + 6 * np.eye(6)
    b = rng.normal(size=(6, 2))
    total = np.array([1.5, -2.0])
    phi = solve_constrained(a, b, total)
    np.testing.assert_allclose(phi.sum(axis=0), total, atol=1e-12)
    # KKT: A phi - b is a multiple of the ones vector (the constraint's Lagrange multiplier).
    residual = a @ phi - b
    np.testing.assert_allclose(residual - residual.mean(axis=0), 0, atol=1e-12)


def test_singular_regression_is_a_domain_error():
    with pytest.raises(EstimationError, match="increase nsamples"):
        solve_constrained(np.ones((3, 3)), np.ones((3, 1)), np.ones(1))


def test_combine_requires_each_shard_exactly_once():
    parts = [ShardStatistics.zeros(i, 4, 2) for i in range(3)]
    with pytest.raises(EstimationError, match="once each"):
        combine(parts + [ShardStatistics.zeros(1, 4, 2)], 3)
    with pytest.raises(EstimationError, match="once each"):
        combine(parts[:2], 3)
    assert combine(list(reversed(parts)), 3).n_coalitions == 0


def test_statistics_round_trip_through_arrays():
    stats = ShardStatistics.zeros(2, 5, 3)
    z = np.array([[1, 0, 1, 0, 1], [0, 1, 0, 1, 0]], dtype=bool)
    stats.add_sampled(z, np.array([4, 4]), y=np.ones((2, 3)))
    again = ShardStatistics.from_arrays(stats.to_arrays())
    assert again.shard_index == 2 and again.sampled_count == 2
    np.testing.assert_array_equal(np.unpackbits(again.sampled_bits, axis=1, count=5).astype(bool), z)


def test_batches_are_full_across_unit_boundaries():
    from shapfleet.workers.engine.evaluation import _full_batches

    class Plan:  # just what the batcher reads
        design = CoalitionDesign.create(20, 1000, seed=1)

    units = Plan.design.units
    batches = list(_full_batches(Plan, units, 16))
    sizes = [sum(len(rows) for _, rows, _ in parts) for parts in batches]
    assert all(size == 16 for size in sizes[:-1]) and 0 < sizes[-1] <= 16
    assert sum(sizes) == Plan.design.n_coalitions
    rows = np.concatenate([rows for parts in batches for _, rows, _ in parts])
    expected = np.concatenate([Plan.design.coalitions(u)[0] for u in units])
    np.testing.assert_array_equal(rows, expected)  # same coalitions, same order


def test_shards_are_handed_out_largest_first():
    """Shards are unequal (whole work units); every shard of every image is dispatched once, in
    decreasing evaluation count, so the small ones even out the end of a job."""
    from shapfleet.workers.engine.planning import largest_shards_first, plan_explanation
    from shapfleet.workers.engine.settings import ExplainSettings

    image = np.random.default_rng(0).uniform(0, 255, (16, 16, 3)).astype(np.float32)
    predict = lambda x: x.reshape(len(x), -1)[:, :3].astype(np.float64)  # noqa: E731
    plans = []
    for grid, nsamples, shards in (("4x4", 1500, 7), ("3x4", 600, 5)):
        plan = plan_explanation(image, predict, ExplainSettings(segmenter="grid", grid=grid, nsamples=nsamples,
                                                                all_classes=True))
        plan.split(shards)
        plans.append(plan)
    order = largest_shards_first(plans)
    assert sorted(order) == [(n, i) for n, plan in enumerate(plans) for i in range(plan.n_shards)]
    sizes = [plans[n].shard_evaluations(i) for n, i in order]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert order != sorted(order)  # index order is not already largest first here


def test_the_engine_keeps_blas_to_one_thread_while_it_computes(monkeypatch):
    """Spinning BLAS threads slow onnxruntime's threads between batches (shapfleet.workers.engine.threads): shard
    evaluation and the reduce run with one BLAS thread, and the caller's setting comes back after."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from shapfleet.workers.engine import estimation
    from shapfleet.workers.engine.evaluation import evaluate_shard
    from shapfleet.workers.engine.planning import plan_explanation
    from shapfleet.workers.engine.settings import ExplainSettings

    def blas_threads() -> set[int]:
        return {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}

    seen: list[set[int]] = []

    def predict(x):
        seen.append(blas_threads())
        return x.reshape(len(x), -1)[:, :3].astype(np.float64)

    image = np.random.default_rng(0).uniform(0, 255, (16, 16, 3)).astype(np.float32)
    with threadpool_limits(limits=2, user_api="blas"):
        assert blas_threads() == {2}
        plan = plan_explanation(image, predict, ExplainSettings(segmenter="grid", grid="4x4", nsamples=300,
                                                                all_classes=True, batch_size=32))
        seen.clear()
        stats = evaluate_shard(plan, 0, predict)
        assert seen and all(threads == {1} for threads in seen)
        assert blas_threads() == {2}
        jackknife, inside = estimation._jackknife_std, []
        monkeypatch.setattr(estimation, "_jackknife_std", lambda *args: (inside.append(blas_threads()), jackknife(*args))[1])
        estimation.estimate(plan.design, stats, plan.v_empty, plan.v_full, "linear")
        assert inside == [{1}] and blas_threads() == {2}

"""The evolutionary engine on synthetic objectives with known optima (no model involved)."""

import itertools
import random
import sys

import pytest

from optimum_evo.search import (
    CHECKPOINT_NAME, EvolutionarySearch, LevelSpace, SearchConfig, Stage, level_switch, mutate,
    num_switches, random_candidate,
)


class TableObjective:
    """Deterministic objective f(candidate), optionally with per-sample noise."""

    def __init__(self, fn, num_samples=64, noise=0.0, seed=0):
        self.fn, self.num_samples, self.tokens_per_sample, self.noise = fn, num_samples, 16, noise
        rnd = random.Random(seed)
        self.sample_noise = [rnd.gauss(0, 1) for _ in range(num_samples)]
        self.calls = 0
        self.parents = []

    def score(self, cands, ids):
        self.calls += 1
        # Noise depends on candidate and sample, averages out with more samples.
        out = []
        for c in cands:
            n = sum(self.sample_noise[(i + hash(c)) % self.num_samples] for i in ids) / len(ids)
            out.append(self.fn(c) + self.noise * n)
        return out

    def set_parent(self, c):
        self.parents.append(c)


def depth_like_space(n=12, groups=None):
    return LevelSpace(tuple(f"u{i}" for i in range(n)), (2,) * n, tuple(groups or (0,) * n))


def brute_force(space, budget_candidate, fn):
    sums = space.group_sums(budget_candidate)
    best = None
    for levels in itertools.product(*[range(k) for k in space.num_levels]):
        if space.group_sums(levels) == sums and (best is None or fn(levels) < fn(best)):
            best = levels
    return best


def test_num_switches_distribution():
    rng = random.Random(0)
    counts = [0, 0, 0, 0]
    for _ in range(9000):
        counts[num_switches(rng)] += 1
    # P(1) = 5/9, P(2) = 3/9, P(3) = 1/9
    assert abs(counts[1] / 9000 - 5 / 9) < 0.03
    assert abs(counts[2] / 9000 - 3 / 9) < 0.03
    assert abs(counts[3] / 9000 - 1 / 9) < 0.02


def test_budget_exact_under_any_mutation_sequence():
    space = LevelSpace(tuple(f"u{i}" for i in range(9)), (6, 6, 6, 3, 3, 3, 2, 2, 2), (0, 0, 0, 1, 1, 1, 2, 2, 2))
    rng = random.Random(1)
    c = (2, 3, 1, 0, 2, 1, 1, 0, 0)
    sums = space.group_sums(c)
    for _ in range(3000):
        c = mutate(c, space, rng)
        assert space.group_sums(c) == sums
        space.validate(c)


def test_budget_exact_with_unequal_step_costs():
    # bit widths 2,3,4,5,6,8: the last step costs 2 bits; units of two sizes
    bits = (2, 3, 4, 5, 6, 8)
    costs = ((1, 1, 1, 1, 2),) * 8
    space = LevelSpace(tuple(f"u{i}" for i in range(8)), (6,) * 8, (0, 0, 0, 0, 1, 1, 1, 1), costs)
    rng = random.Random(3)
    c = (1, 1, 1, 1, 4, 4, 2, 2)  # 3,3,3,3 / 6,6,4,4 bits
    bitsum = lambda c: [sum(bits[x] for x in c[:4]), sum(bits[x] for x in c[4:])]  # noqa: E731
    start, seen_top = bitsum(c), False
    for _ in range(3000):
        c = mutate(c, space, rng)
        assert bitsum(c) == start
        seen_top |= 5 in c
    assert seen_top, "the 6 -> 8 bit step must be reachable"
    with pytest.raises(ValueError, match="step_costs"):
        LevelSpace(("a",), (3,), (0,), ((1,),))


def test_switch_impossible_returns_same():
    space = LevelSpace(("a", "b"), (2, 2), (0, 1))  # each group has one unit: no switch possible
    assert level_switch((1, 0), space, random.Random(0)) == (1, 0)


def test_random_candidate_is_feasible_and_varied():
    space = depth_like_space(10)
    ref = (1,) * 4 + (0,) * 6
    rng = random.Random(0)
    seen = {random_candidate(space, ref, rng) for _ in range(50)}
    assert len(seen) > 20
    assert all(sum(c) == 4 for c in seen)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_global_optimum_non_separable(seed):
    """Pairwise interactions make the objective non-separable and non-monotone."""
    n = 12
    rnd = random.Random(100 + seed)
    q = [[rnd.gauss(0, 1) for _ in range(n)] for _ in range(n)]
    lin = [rnd.gauss(0, 1) for _ in range(n)]

    def fn(c):
        return sum(lin[i] * c[i] for i in range(n)) + sum(q[i][j] * c[i] * c[j] for i in range(n) for j in range(i))

    space = depth_like_space(n)
    start = (1,) * 5 + (0,) * 7
    optimum = brute_force(space, start, fn)
    cfg = SearchConfig(generations=120, offspring=8, stages=(Stage(3, 32), Stage(1, 128)), init_tokens=64, seed=seed)
    res = EvolutionarySearch(space, TableObjective(fn), cfg, progress=False).run([start])
    assert res.best == optimum
    assert sum(res.best) == 5


def test_finds_optimum_with_groups_and_multilevels_under_noise():
    # Quantization-like: 6 units in 2 size groups, 4 levels; per-unit error grows with the level
    # at unit-specific rates, plus an interaction term that makes the objective non-separable.
    space = LevelSpace(tuple(f"u{i}" for i in range(6)), (4,) * 6, (0, 0, 0, 1, 1, 1))
    rnd = random.Random(7)
    table = [list(itertools.accumulate([0.0] + [rnd.uniform(0, 2) for _ in range(3)])) for _ in range(6)]

    def fn(c):
        return sum(table[i][c[i]] for i in range(6)) + 0.5 * (c[0] == c[3])

    start = (2, 1, 1, 1, 2, 1)
    optimum = brute_force(space, start, fn)
    cfg = SearchConfig(generations=150, offspring=8, stages=(Stage(2, 64), Stage(1, 512)), init_tokens=64, seed=3)
    res = EvolutionarySearch(space, TableObjective(fn, noise=0.01), cfg, progress=False).run([start])
    assert res.best == optimum
    assert space.group_sums(res.best) == space.group_sums(start)


def test_best_initial_is_chosen_and_parent_never_gets_worse():
    space = depth_like_space(8)
    fn = lambda c: float(sum(i * c[i] for i in range(8)))  # noqa: E731
    inits = [(0, 0, 0, 0, 1, 1, 1, 1), (1, 1, 0, 0, 1, 1, 0, 0), (1, 0, 1, 0, 1, 0, 1, 0)]
    cfg = SearchConfig(generations=30, offspring=4, stages=(Stage(1, 16),), init_tokens=16)
    res = EvolutionarySearch(space, TableObjective(fn), cfg, progress=False).run(inits)
    assert res.initial_scores == [fn(c) for c in inits]
    fits = [h["best_fitness"] for h in res.history]
    assert fits[0] <= min(res.initial_scores)
    assert all(b <= a for a, b in zip(fits, fits[1:]))  # elitist, noise-free
    assert res.best == (1, 1, 1, 1, 0, 0, 0, 0)


def test_reproducible_with_seed():
    space = depth_like_space(10)
    fn = lambda c: float(sum((i % 3 - 1) * c[i] * c[(i + 1) % 10] for i in range(10)))  # noqa: E731
    cfg = SearchConfig(generations=15, offspring=6, stages=(Stage(2, 32), Stage(1, 64)), seed=5)
    runs = [EvolutionarySearch(space, TableObjective(fn, noise=0.3), cfg, progress=False).run([(1,) * 4 + (0,) * 6])
            for _ in range(2)]
    assert runs[0].best == runs[1].best
    assert [h["best_fitness"] for h in runs[0].history] == [h["best_fitness"] for h in runs[1].history]


def test_callback_sees_each_generations_parent():
    space = depth_like_space(10)
    fn = lambda c: float(sum((i % 3 - 1) * c[i] * c[(i + 1) % 10] for i in range(10)))  # noqa: E731
    cfg = SearchConfig(generations=12, offspring=6, stages=(Stage(2, 32), Stage(1, 64)), seed=5)
    seen = []
    res = EvolutionarySearch(space, TableObjective(fn), cfg, progress=False,
                             callback=lambda g, entry: seen.append((g, entry))).run([(1,) * 4 + (0,) * 6])
    assert [g for g, _ in seen] == list(range(1, 13))
    assert [e["best_fitness"] for _, e in seen] == [h["best_fitness"] for h in res.history]
    assert all(e["best_fitness"] == fn(e["parent"]) for _, e in seen)  # noise-free: the parent's own score
    assert tuple(seen[-1][1]["parent"]) == res.best and "parent" not in res.history[-1]


def test_killed_search_resumes_to_same_result(tmp_path):
    space = depth_like_space(14)
    rnd = random.Random(3)
    w = [rnd.gauss(0, 1) for _ in range(14)]
    fn = lambda c: sum(w[i] * c[i] * (1 + c[(i + 3) % 14]) for i in range(14))  # noqa: E731
    cfg = SearchConfig(generations=25, offspring=6, stages=(Stage(2, 32), Stage(1, 96)), init_tokens=32, seed=11)
    inits = [(1,) * 5 + (0,) * 9, (0,) * 9 + (1,) * 5]
    full = EvolutionarySearch(space, TableObjective(fn, noise=0.2), cfg, progress=False).run(inits)

    class Killed(Exception):
        pass

    def kill_at_10(gen, _):
        if gen == 10:
            raise Killed

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        EvolutionarySearch(space, TableObjective(fn, noise=0.2), cfg, ckpt, progress=False, callback=kill_at_10).run(inits)
    assert (ckpt / CHECKPOINT_NAME).exists()
    obj = TableObjective(fn, noise=0.2)
    resumed = EvolutionarySearch(space, obj, cfg, ckpt, progress=False).run(inits)
    assert resumed.resumed_from == 10
    assert resumed.best == full.best and resumed.fitness == full.fitness
    assert [h["best_fitness"] for h in resumed.history] == [h["best_fitness"] for h in full.history]
    assert obj.parents, "the objective must be told the parent after a resume"


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    space = depth_like_space(6)
    fn = lambda c: float(c[0])  # noqa: E731
    EvolutionarySearch(space, TableObjective(fn), SearchConfig(generations=2, offspring=2, stages=((1, 16),)),
                       tmp_path, progress=False).run([(1, 1, 0, 0, 0, 0)])
    with pytest.raises(ValueError, match="different search settings"):
        EvolutionarySearch(space, TableObjective(fn), SearchConfig(generations=3, offspring=2, stages=((1, 16),)),
                           tmp_path, progress=False).run([(1, 1, 0, 0, 0, 0)])
    (tmp_path / CHECKPOINT_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        EvolutionarySearch(space, TableObjective(fn), SearchConfig(generations=2, offspring=2, stages=((1, 16),)),
                           tmp_path, progress=False).run([(1, 1, 0, 0, 0, 0)])


def test_config_validation_messages():
    with pytest.raises(ValueError, match="exactly 1 survivor"):
        SearchConfig(stages=((2, 10),))
    from optimum_evo.methods import get_method

    presets = get_method("depth").presets
    with pytest.raises(ValueError, match="Unknown preset"):
        SearchConfig.from_preset("turbo", presets)
    cfg = SearchConfig.from_preset("paper", presets).resolve_generations(num_units=32, num_changed=8)
    assert cfg.generations == 128 and cfg.offspring == 32
    with pytest.raises(ValueError, match="same budget"):
        EvolutionarySearch(depth_like_space(4), TableObjective(sum), SearchConfig(stages=((1, 1),)),
                           progress=False).run([(1, 0, 0, 0), (1, 1, 0, 0)])


def test_engine_imports_no_transformers():
    import subprocess
    code = "import sys, optimum_evo.search; assert 'transformers' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_confirmation_stage_rejects_noisy_false_improvements():
    # Start at the optimum; the last stage sees one noisy sample (sd 1 >> the gaps of 0.5 or more),
    # so without confirmation worse children replace the parent. Confirming on all 64 samples
    # (sd 0.125) keeps the optimum and costs tokens only when a child looked better.
    space = depth_like_space(8)
    weights = [0.5 * i for i in range(8)]

    def fn(c):
        return sum(w * x for w, x in zip(weights, c))

    start = (1, 1, 1, 1, 0, 0, 0, 0)
    base = dict(generations=40, offspring=4, stages=(Stage(1, 16),), init_tokens=16, seed=1)
    plain = EvolutionarySearch(space, TableObjective(fn, noise=1.0), SearchConfig(**base), progress=False).run([start])
    confirmed = EvolutionarySearch(space, TableObjective(fn, noise=1.0), SearchConfig(**base, confirm_tokens=64 * 16),
                                   progress=False).run([start])
    assert fn(plain.best) > fn(start)  # noise drove the unconfirmed search away from the optimum
    assert confirmed.best == start
    extra = [h["tokens"] - 5 * 16 for h in confirmed.history]
    assert set(extra) <= {0, 2 * 64 * 16} and 0 in extra  # paid only on challenges
    with pytest.raises(ValueError, match="confirm_tokens"):
        SearchConfig(confirm_tokens=0)
    assert "confirm_tokens" not in SearchConfig().to_dict()  # old fingerprints unchanged

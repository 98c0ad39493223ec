"""Quantization and sparsity spaces over a level database (tiny Llama)."""

import random

import pytest
import torch

from conftest import tiny_model
from optimum_evo.compressors.database import LevelDatabase
from optimum_evo.fitness import KLObjective, TeacherCache
from optimum_evo.search import mutate
from optimum_evo.methods.quantization import QuantizationSpace
from optimum_evo.methods.sparsity import SparsitySpace

WINDOWS = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def quant(tmp_path_factory):
    model = tiny_model("llama", num_hidden_layers=2)
    db = LevelDatabase.build(model, WINDOWS, "quantization", [2, 3, 4, 8], tmp_path_factory.mktemp("q") / "db",
                             settings={"group_size": 32}, progress=False)
    return model, db


def test_quantization_budget_exact(quant):
    model, db = quant
    assert QuantizationSpace(model, db, 2.5).average_bits(QuantizationSpace(model, db, 2.5).uniform()) == 2.5
    space = QuantizationSpace(model, db, 3.5)
    start = space.uniform()
    assert space.average_bits(start) == pytest.approx(3.5)
    rng = random.Random(0)
    c, seen8 = start, False
    for _ in range(2000):
        c = mutate(c, space.level_space, rng)
        assert space.average_bits(c) == pytest.approx(3.5)
        seen8 |= 3 in c
    assert seen8, "the 4 -> 8 bit step (cost 4) must be reachable by compensating 1-bit steps"
    d = space.describe(start)
    assert d["effective_bits"] > d["average_bits"]  # scales and zeros counted
    with pytest.raises(ValueError, match="outside"):
        QuantizationSpace(model, db, 9)


def test_apply_swaps_and_restores(quant):
    model, db = quant
    space = QuantizationSpace(model, db, 3)
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in db.modules}
    cand = space.uniform()
    space.apply(model, cand)
    name = space.names[0]
    assert torch.equal(model.get_submodule(name).weight, db.weight(name, 3))
    space.restore(model)
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in dense.items())


def test_objective_with_prefix_reuse_on_quantization(quant):
    model, db = quant
    space = QuantizationSpace(model, db, 3)
    teacher = TeacherCache.build(model, WINDOWS, "topk", 32, progress=False)
    a = KLObjective(model, WINDOWS, teacher, space)
    b = KLObjective(model, WINDOWS, teacher, space, reuse_prefix=False)
    parent = space.uniform()
    a.set_parent(parent)
    b.set_parent(parent)
    rng = random.Random(0)
    kids = [mutate(parent, space.level_space, rng) for _ in range(4)]
    assert a.score(kids + [parent], [0, 2]) == b.score(kids + [parent], [0, 2])
    assert min(a.score(kids, [0, 1])) > 0
    space.restore(model)


def test_sparsity_levels_and_exact_budget(tmp_path):
    model = tiny_model("llama", num_hidden_layers=2)
    target, step, max_offset = 0.5, 600, 3
    levels = lambda name, shape: SparsitySpace.level_fractions(shape[0] * shape[1], target, step, max_offset)  # noqa: E731
    db = LevelDatabase.build(model, WINDOWS, "sparsity", levels, tmp_path / "db", progress=False)
    space = SparsitySpace(model, db, target, step, max_offset)
    counts = [len(lv) for lv in space.unit_levels]
    assert max(counts) == 7 and min(counts) < 7  # k/v projections (2048 weights) are too small for 3 steps
    start = space.uniform()
    base = space.pruned_weights(start)
    assert base == sum(round(target * n) for n in space.numel)
    rng = random.Random(0)
    c = start
    for _ in range(300):
        c = mutate(c, space.level_space, rng)
        assert space.pruned_weights(c) == base
    space.apply(model, c)
    zeros = sum(int((model.get_submodule(n).weight == 0).sum()) for n in space.names)
    assert zeros == base
    with pytest.raises(ValueError, match="do not match"):
        SparsitySpace(model, db, target, 700, max_offset)
    # A database for another target has the same shape of space (units, level counts) but other
    # levels: its fingerprint differs, so a search checkpoint of one is never resumed on the other.
    levels6 = lambda name, shape: SparsitySpace.level_fractions(shape[0] * shape[1], 0.55, step, max_offset)  # noqa: E731
    db6 = LevelDatabase.build(model, WINDOWS, "sparsity", levels6, tmp_path / "db6", progress=False,
                              identity={"target": 0.55})
    space6 = SparsitySpace(model, db6, 0.55, step, max_offset)
    assert space6.level_space.num_levels == space.level_space.num_levels
    assert space6.level_space.fingerprint() != space.level_space.fingerprint()
    assert SparsitySpace(model, db, target, step, max_offset).level_space.fingerprint() == space.level_space.fingerprint()


def test_knapsack_is_exact_and_optimal():
    import itertools

    from optimum_evo.methods.layerwise import knapsack
    rnd = random.Random(0)
    costs = [[rnd.randint(0, 4) for _ in range(3)] for _ in range(5)]
    errors = [[rnd.random() for _ in range(3)] for _ in range(5)]
    budget = 9
    best = min((c for c in itertools.product(range(3), repeat=5) if sum(costs[i][j] for i, j in enumerate(c)) == budget),
               key=lambda c: sum(errors[i][j] for i, j in enumerate(c)))
    assert tuple(knapsack(costs, errors, budget)) == best
    with pytest.raises(ValueError, match="budget"):
        knapsack(costs, errors, 100)
    # at_most: the best assignment whose cost does not exceed the budget
    for budget in (sum(min(c) for c in costs) + 1, 9):
        best = min((c for c in itertools.product(range(3), repeat=5)
                    if sum(costs[i][j] for i, j in enumerate(c)) <= budget),
                   key=lambda c: sum(errors[i][j] for i, j in enumerate(c)))
        picked = knapsack(costs, errors, budget, at_most=True)
        assert sum(costs[i][j] for i, j in enumerate(picked)) <= budget
        assert sum(errors[i][j] for i, j in enumerate(picked)) == pytest.approx(
            sum(errors[i][j] for i, j in enumerate(best)))


def test_dp_and_owl_baselines_keep_budgets(quant, tmp_path):
    from optimum_evo.methods.layerwise import dp_candidate
    from optimum_evo.methods.sparsity import owl_candidate
    model, db = quant
    space = QuantizationSpace(model, db, 3)
    dp = dp_candidate(space)
    assert space.average_bits(dp) == pytest.approx(3.0)
    total_err = lambda c: sum(db.error(n, space.bits[j]) for n, j in zip(space.names, c))  # noqa: E731
    assert total_err(dp) <= total_err(space.uniform()) + 1e-12
    model2 = tiny_model("llama", num_hidden_layers=3)
    levels = lambda name, shape: SparsitySpace.level_fractions(shape[0] * shape[1], 0.6, 400, 4)  # noqa: E731
    sdb = LevelDatabase.build(model2, WINDOWS, "sparsity", levels, tmp_path / "db", progress=False)
    sspace = SparsitySpace(model2, sdb, 0.6, 400, 4)
    base = sspace.pruned_weights(sspace.uniform())
    for cand in (dp_candidate(sspace), owl_candidate(sspace, 0.08, 5), owl_candidate(sspace, 0.2, 3)):
        assert sspace.pruned_weights(cand) == base
    assert owl_candidate(sspace, 0.2, 3) != sspace.uniform()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_shared_input_groups_are_the_fused_projections(arch):
    from optimum_evo.decoder import shared_input_groups

    model = tiny_model(arch, num_hidden_layers=3)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    groups = [[names[i].split(".layers.")[1] for i in g] for g in shared_input_groups(model, names)]
    expected = []
    for layer in range(3):
        expected += [[f"{layer}.self_attn.{p}_proj" for p in "qkv"], [f"{layer}.self_attn.o_proj"],
                     [f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj"], [f"{layer}.mlp.down_proj"]]
    assert groups == expected
    # only the linears asked about are grouped; a model whose forward fails gives singletons
    assert shared_input_groups(model, names[1:3]) == [[0, 1]]
    broken = tiny_model(arch, num_hidden_layers=3)
    broken.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no"))
    assert shared_input_groups(broken, names[:3]) == [[0], [1], [2]]


@pytest.mark.parametrize("target", [2.5, 3.0, 3.5])
def test_fused_groups_share_one_width_and_keep_the_budget_exact(quant, target):
    model, db = quant
    space = QuantizationSpace(model, db, target, fused_groups=True)
    assert space.level_space.num_units == 8  # 2 layers x (qkv, o, gate+up, down)
    assert space.level_space.unit_names[0].endswith("q_proj+k_proj+v_proj")
    rng = random.Random(0)
    c = space.uniform()
    widths = set()
    for step in range(500):
        profile = space.profile(c)
        for layer in range(2):
            attn = {profile[f"model.layers.{layer}.self_attn.{p}_proj"] for p in "qkv"}
            mlp = {profile[f"model.layers.{layer}.mlp.{p}_proj"] for p in ("gate", "up")}
            assert len(attn) == 1 and len(mlp) == 1
            widths |= attn
        assert space.average_bits(c) == pytest.approx(target)
        c = mutate(c, space.level_space, rng)
    assert len(widths) > 1  # the fused units do change width
    # the DP baseline works on fused units and keeps the budget
    from optimum_evo.methods.layerwise import dp_candidate

    assert space.average_bits(dp_candidate(space)) == pytest.approx(target)
    # the search fingerprint differs from the per-linear space's (no resume across the two)
    assert space.level_space.fingerprint() != QuantizationSpace(model, db, target).level_space.fingerprint()

"""Joint search under a size or speed budget: the budget space's mutation, size parsing, the stored
size equal to the accounted one, reload and plugin-free exports, latency tables (reuse, rebuild when
stale), single kinds under a budget, and bad budgets refused early."""

import json
import random
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import save_tiny_llama

from optimum_evo import SearchArguments
from optimum_evo.methods.joint import parse_size
from optimum_evo.search import BudgetSpace, EvolutionarySearch, SearchConfig, Stage

# --------------------------------------------------------------------------- the engine's space
def toy_space(budget=60):
    # units 0, 1: parents (off / on, costing 0 / 2); 2-5 children of 0; 6-9 children of 1; 10-11 free
    costs = [(0, 2), (0, 2)] + [(1, 2, 4, 8)] * 10
    parents = (-1, -1) + (0,) * 4 + (1,) * 4 + (-1, -1)
    return BudgetSpace(tuple(f"u{i}" for i in range(12)), tuple(costs), budget, parents, shared=(((0, 1), 3),),
                       fixed_cost=5)


def test_budget_space_mutations_stay_feasible_full_and_canonical():
    space = toy_space()
    rng = random.Random(0)
    cand = space.fill(space.validate([1, 1] + [0] * 10), rng)
    seen_off = False
    for _ in range(400):
        cand = space.mutate(cand, rng)
        space.validate(cand)  # inactive units sit at level 0
        assert space.cost(cand) <= space.budget
        assert space.is_full(cand)
        seen_off |= cand[0] == 0 or cand[1] == 0
    assert seen_off, "parents must be switched off by some mutations"


def test_budget_space_costs_parents_shared_and_fixed():
    space = toy_space()
    all_off = (0,) * 12
    assert space.cost(all_off) == 5 + 1 + 1  # fixed + the two free units at level 0
    one_on = (1, 0) + (0,) * 10
    assert space.cost(one_on) == 5 + 2 + 3 + 4 * 1 + 2  # parent, shared, its 4 children, free units
    with pytest.raises(ValueError, match="must be at level 0"):
        space.validate((0, 1, 2) + (0,) * 9)
    with pytest.raises(ValueError, match="over the budget"):
        space.check_initial([(1, 1) + (3,) * 10])
    assert toy_space(61).fingerprint() != space.fingerprint()
    with pytest.raises(ValueError, match="must not decrease"):
        BudgetSpace(("a",), ((2, 1),), 5)


def test_engine_finds_the_best_allocation_under_a_budget():
    # two units at 4 levels costing 1, 2, 4, 8; loss favours unit 0's levels 4x as much as unit 1's
    space = BudgetSpace(("a", "b"), ((1, 2, 4, 8), (1, 2, 4, 8)), 10)

    class Objective:
        num_samples, tokens_per_sample = 4, 1

        def score(self, cands, ids):
            return [4.0 * (3 - c[0]) + (3 - c[1]) for c in cands]

    cfg = SearchConfig(generations=30, offspring=6, stages=(Stage(1, 2),), init_tokens=2)
    result = EvolutionarySearch(space, Objective(), cfg, progress=False).run([(1, 3)])
    assert result.best == (3, 1) and space.cost(result.best) == 10


def layered_space(budget=70):
    # 4 parents (sub-blocks, off / on costing 0 / 2), 4 leaves under each, 4 free leaves
    costs = [(0, 2)] * 4 + [(1, 2, 4, 8)] * 20
    parents = (-1,) * 4 + tuple(i // 4 for i in range(16)) + (-1,) * 4
    return BudgetSpace(tuple(f"u{i}" for i in range(24)), tuple(costs), budget, parents)


class LayeredObjective:
    """Leaves lose ``(3 - level) * weight`` while active; each parent kept costs ``per_parent``."""
    num_samples, tokens_per_sample = 8, 1

    def __init__(self, space, per_parent):
        self.space, self.per_parent = space, per_parent

    def score(self, cands, ids):
        return [sum((3 - c[i]) * (1 + i % 3) for i in range(4, 24) if self.space.active(c, i))
                + self.per_parent * sum(c[:4]) for c in cands]


def structure_rates(per_parent, seeds=range(6), generations=30):
    out = []
    for seed in seeds:
        space = layered_space()
        start = space.fill((1,) * 20 + (0,) * 4, random.Random(0))
        cfg = SearchConfig(generations=generations, offspring=8, stages=(Stage(1, 2),), init_tokens=2, seed=seed,
                           structure_moves="adaptive")
        result = EvolutionarySearch(space, LayeredObjective(space, per_parent), cfg, progress=False).run([start])
        out.append([h["structure_rate"] for h in result.history])
    return out


def test_structural_moves_are_drawn_at_the_rate_asked():
    space = layered_space()
    start = space.fill((1,) * 20 + (0,) * 4, random.Random(0))
    assert space.structure_share() == 4 / 24
    for rate, lo, hi in ((0.0, 0, 0), (1.0, 300, 300), (0.5, 110, 190)):
        rng = random.Random(1)
        moved = sum(space.switch(start, rng, structure_rate=rate)[:4] != start[:4] for _ in range(300))
        assert lo <= moved <= hi, (rate, moved)
    assert BudgetSpace(("a", "b"), ((1, 2), (1, 2)), 3).structure_share() is None  # nothing to adapt


def test_engine_spends_fewer_moves_on_sub_blocks_where_drops_do_not_pay():
    share = 4 / 24
    # every kept sub-block is needed: structural children lose, the rate falls below the uniform share
    losing = structure_rates(per_parent=-100)
    assert all(r[0] == share for r in losing)
    late = [x for r in losing for x in r[10:]]
    assert sum(late) / len(late) < 0.75 * share
    assert min(late) == 1 / 24  # the floor: one unit's share, never zero
    # sub-blocks are harmful: dropping them pays early on, and the rate rises above the share
    paying = structure_rates(per_parent=10, generations=6)
    assert sum(max(r) > share for r in paying) >= 4
    assert max(x for r in paying for x in r) <= 0.5


def test_killed_joint_search_resumes_with_its_structure_rate(tmp_path):
    space = layered_space()
    start = space.fill((1,) * 20 + (0,) * 4, random.Random(0))
    cfg = SearchConfig(generations=16, offspring=6, stages=(Stage(1, 2),), init_tokens=2, seed=5,
                       structure_moves="adaptive")
    full = EvolutionarySearch(space, LayeredObjective(space, -100), cfg, progress=False).run([start])

    class Killed(Exception):
        pass

    def kill_at_7(gen, _):
        if gen == 7:
            raise Killed

    with pytest.raises(Killed):
        EvolutionarySearch(space, LayeredObjective(space, -100), cfg, tmp_path, progress=False,
                           callback=kill_at_7).run([start])
    resumed = EvolutionarySearch(space, LayeredObjective(space, -100), cfg, tmp_path, progress=False).run([start])
    assert resumed.resumed_from == 7
    assert [h["structure_rate"] for h in resumed.history] == [h["structure_rate"] for h in full.history]
    assert resumed.best == full.best
    assert len({h["structure_rate"] for h in full.history}) > 1


def test_adaptive_structure_moves_is_a_setting_and_uniform_leaves_the_share_fixed():
    space = layered_space()
    start = space.fill((1,) * 20 + (0,) * 4, random.Random(0))
    cfg = SearchConfig(generations=5, offspring=6, stages=(Stage(1, 2),), init_tokens=2)
    assert cfg.structure_moves == "uniform"
    result = EvolutionarySearch(space, LayeredObjective(space, -100), cfg, progress=False).run([start])
    assert result.generations == 5 and all("structure_rate" not in h for h in result.history)
    adaptive = SearchConfig(generations=5, offspring=6, stages=(Stage(1, 2),), init_tokens=2, structure_moves="adaptive")
    assert cfg.fingerprint() != adaptive.fingerprint()
    assert "structure_moves" not in cfg.to_dict()  # fingerprints of earlier configs unchanged
    with pytest.raises(ValueError, match="structure_moves"):
        SearchConfig(structure_moves="often")
    args = SearchArguments(model="smollm2", compression=["depth", "quantization"], target_size="60MB",
                           structure_moves="adaptive")
    assert args.search_config().structure_moves == "adaptive"
    assert SearchArguments(model="smollm2", compression=["depth", "quantization"],
                           target_size="60MB").search_config().structure_moves == "uniform"
    with pytest.raises(ValueError, match="structure_moves"):
        SearchArguments(model="smollm2", compression=["depth", "quantization"], target_size="60MB",
                        structure_moves="often")


@pytest.mark.parametrize("text, expected", [
    ("60MB", ("bytes", 60_000_000)), ("57 MiB", ("bytes", 57 * 2 ** 20)), ("1.2GB", ("bytes", 1_200_000_000)),
    ("25%", ("fraction", 0.25)), (0.3, ("fraction", 0.3)), ("0.3", ("fraction", 0.3)), (123456, ("bytes", 123456)),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("settings, message", [
    (dict(compression="depth,quantization"), "needs one budget"),
    (dict(compression="depth,quantization", target_size="60MB", target_speedup=2.0), "needs one budget"),
    (dict(compression="depth,quantization", target_size="sixty"), "target_size must be a size"),
    (dict(compression="depth,quantization", target_size="150%"), "percentage"),
    (dict(compression="depth,quantization", target_speedup=0.8), "target_speedup must be a number > 1"),
    (dict(compression="depth,quantization", target_size="1MB", lora_correction=4), "not to a joint search"),
    (dict(compression="depth,quantization", target_size="1MB", mode="block"), "mode='separate'"),
    (dict(compression="depth", target_size="1MB"), "depth has no size or speed budget"),
    (dict(compression="depth,pruning", target_size="1MB"), "Unknown compression 'pruning'"),
    (dict(compression="depth,depth", target_size="1MB"), "names a kind twice"),
    (dict(compression="depth,quantization", target_size="1MB", levels=[3, 9]), "bit widths in 1..8"),
])
def test_bad_budgets_fail_early(settings, message):
    with pytest.raises(ValueError, match=message):
        SearchArguments(**settings)


def test_compression_lists_and_config():
    from optimum_evo import EvoPressConfig

    assert SearchArguments(compression=["quantization", "depth"], target_size="60MB").compression == \
        "depth+quantization"
    config = EvoPressConfig(compression=["depth", "quantization"], target_size="60MB")
    assert config.compression == "depth+quantization" and config.method.kinds == ("depth", "quantization")


# --------------------------------------------------------------------------- whole runs
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-joint"), 32, 64, 6, scale=6.0)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "optimum_evo", *map(str, args)], capture_output=True, text=True)


def common(tiny_dir, out, *extra):
    return ["search", "--model", tiny_dir, "--levels", "2,3,4", "--group-size", "32", "--sym", "--generations", 4,
            "--offspring", 4, "--num-samples", 6, "--seq-len", 32, "--eval-windows", 2, "--eval-seq-len", 32,
            "--dataset", tiny_dir.parent / "calib.txt", "--search-dtype", "float32", "--quiet", "--top-k", 64,
            "--output", out, "--database-dir", tiny_dir.parent / "db", *extra]


def tensor_bytes(path) -> int:
    with safe_open(str(path), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


def test_joint_size_budget_saves_what_it_accounted_reloads_and_exports(tiny_dir, tmp_path):
    import optimum_evo
    from optimum_evo.exporters.from_result import compressed_model_from_result

    out = tmp_path / "out"
    proc = run_cli(*common(tiny_dir, out, "--compression", "depth,quantization", "--target-size", 0.97,
                           "--compare-baselines", "--random-candidates", 3, "--export", "dense",
                           "--export", "compressed-tensors", "--structure-moves", "adaptive"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "result.json").read_text())
    assert report["compression"] == "depth+quantization"
    budget = report["baseline_settings"]["budget"]["value"]
    dense_bytes = tensor_bytes(tiny_dir / "model.safetensors")
    assert budget == int(0.97 * dense_bytes)
    assert {"uniform", "dp", "random_best_of_3", "evopress"} <= set(report["results"])
    assert any(k.startswith("depth") and k.endswith("+uniform") for k in report["results"])
    # the depth-only heuristic in the joint space: the fewest drops with every kept linear dense (then the
    # budget's slack filled: sub-blocks restored at their cheapest levels)
    dense_mix = [row for k, row in report["results"].items() if k.startswith("depth") and k.endswith("%+dense")]
    assert dense_mix and dense_mix[0]["dropped_sub_blocks"] > 0 and "dense" in dense_mix[0]["linears_per_level"]
    # the same from whole-block ShortGPT (depth-only's better heuristic): a block's attention and MLP go together
    # (the budget's slack may restore one of them)
    blocks = [k for k in report["results"] if k.startswith("blocks") and "%+" in k]
    assert blocks, list(report["results"])
    # where the slack switched sub-blocks back on, the same drops with the slack unspent are a start too
    results = report["results"]
    unfilled = [k for k in results if k.endswith("-unfilled")]
    assert unfilled, list(results)
    for k in unfilled:
        filled = results[k[: -len("-unfilled")]]
        assert results[k]["dropped_sub_blocks"] > filled["dropped_sub_blocks"], k
        assert results[k]["size_bytes"] < filled["size_bytes"] <= budget, k
    for name, row in report["results"].items():
        if name != "dense":
            assert row["size_bytes"] <= budget, name
    # the checkpoint stores exactly the bytes the search accounted for
    stored = tensor_bytes(out / "model" / "model.safetensors")
    assert stored == report["profile"]["size_bytes"] <= budget
    # and uses the budget: no linear could go one level up
    assert budget - stored < 32 * 64 * 4 // 8
    kinds = {u["kind"] for u in report["levels"].values()}
    assert {"depth", "quantization"} <= kinds
    # asked for, the share of structural moves is adapted per generation and recorded
    rates = [h["structure_rate"] for h in report["search"]["history"]]
    assert len(rates) == report["search"]["generations"] and all(0 < r <= 0.5 for r in rates)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("structural moves")]
    assert line and f"{rates[0]:.0%} of primary moves at the start, {rates[-1]:.0%} at the end" in line[0]
    # reload == the model rebuilt from result.json; exports compute the same outputs without the plugin
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    qc = optimum_evo.check_evopress_model(reloaded)
    assert qc.compression == "depth+quantization" and qc.profile["kinds"] == ["depth", "quantization"]
    rebuilt, _ = compressed_model_from_result(report)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reloaded(ids).logits
        assert torch.equal(expected, rebuilt(ids).logits)
        for fmt, tolerance in (("dense", 1e-4), ("compressed-tensors", 3e-2)):  # the latter stores float16
            plain = AutoModelForCausalLM.from_pretrained(out / f"export-{fmt}", dtype=torch.float32)
            assert (plain(ids).logits - expected).abs().max() < tolerance * expected.abs().max(), fmt
    assert (out / "profile.png").read_bytes()[:4] == b"\x89PNG"


def test_joint_speed_budget_builds_reuses_and_rebuilds_the_latency_table(tiny_dir, tmp_path):
    latency = tmp_path / "latency"
    args = ["--compression", "depth,quantization", "--target-speedup", 1.3, "--latency-dir", latency,
            "--eval-windows", 0, "--no-save-model"]
    first = run_cli(*common(tiny_dir, tmp_path / "a", *args))
    assert first.returncode == 0, first.stderr
    report = json.loads((tmp_path / "a" / "result.json").read_text())
    table = json.loads((latency / "latency.json").read_text())
    assert table["manifest"]["threads"] >= 1 and table["dense_ns"] > 0 and table["linears"]
    assert report["profile"]["predicted_speedup"] >= 1.3 - 1e-9
    assert report["latency"]["budget_ms"] == pytest.approx(report["latency"]["predicted_dense_ms"] / 1.3, rel=1e-6)
    mtime = (latency / "latency.json").stat().st_mtime_ns
    second = run_cli(*common(tiny_dir, tmp_path / "b", *args))
    assert second.returncode == 0, second.stderr
    assert (latency / "latency.json").stat().st_mtime_ns == mtime, "a matching table is reused"
    table["manifest"]["torch"] = "0.0-elsewhere"  # measured with another runtime: stale
    (latency / "latency.json").write_text(json.dumps(table))
    third = run_cli(*common(tiny_dir, tmp_path / "c", *args))
    assert third.returncode == 0, third.stderr
    assert "Rebuilding the latency table" in third.stderr and "torch" in third.stderr
    rebuilt = json.loads((latency / "latency.json").read_text())
    assert rebuilt["manifest"]["torch"] == torch.__version__
    # another kind combination shares the table: only the new kind's levels are timed and added,
    # so the same dense model is predicted and the same budget given
    fourth = run_cli(*common(tiny_dir, tmp_path / "d", "--compression", "depth,sparsity", *args[2:]))
    assert fourth.returncode == 0, fourth.stderr
    shared = json.loads((latency / "latency.json").read_text())
    assert set(shared["manifest"]["levels"]) == {"quantization", "sparsity"}
    assert {k: v for k, v in shared["linears"].items() if "/sparsity/" not in k} == rebuilt["linears"]
    assert any("/sparsity/" in k for k in shared["linears"])
    assert [shared[k] for k in ("fixed_ns", "layer_ns", "dense_ns")] == [rebuilt[k] for k in ("fixed_ns", "layer_ns", "dense_ns")]
    before = json.loads((tmp_path / "c" / "result.json").read_text())["latency"]
    after = json.loads((tmp_path / "d" / "result.json").read_text())["latency"]
    assert after["budget_ms"] == pytest.approx(before["budget_ms"], rel=1e-9)


def test_latency_table_gains_a_new_kind_without_retiming_the_others(tmp_path):
    """A search whose kind the shared table lacks (or whose levels changed) times only that kind's
    levels, with each shape's dense layer in the same rounds, and the new entries are put on the
    table's scale by the ratio of the two dense timings; every other entry stays as it was."""
    from optimum_evo.latency import LatencyTable

    base = {"cpu": "x", "torch": "t", "linears": ["8x8/dense"]}
    calls = []

    def measure(only):
        calls.append(only)
        if only is None:
            return {"linears": {"8x8/dense": 100, "8x8/quantization/3": 40}, "fixed_ns": 7, "layer_ns": 3,
                    "attention_ns": 2, "mlp_ns": 1, "dense_ns": 150}
        slow = 2  # the machine is twice as slow now: the dense layer says so
        return {"linears": {"8x8/dense": 100 * slow, **{f"8x8/{k}/1": 30 * slow for k in only}}}

    first = LatencyTable.open_or_build(tmp_path, {**base, "levels": {"quantization": "h1"}}, measure, progress=False)
    assert calls == [None] and first.linears == {"8x8/dense": 100, "8x8/quantization/3": 40}
    both = LatencyTable.open_or_build(tmp_path, {**base, "levels": {"quantization": "h1", "sparsity": "h2"}},
                                      measure, progress=False)
    assert calls == [None, ["sparsity"]]
    assert both.linears == {"8x8/dense": 100, "8x8/quantization/3": 40, "8x8/sparsity/1": 30}
    assert (both.fixed_ns, both.dense_ns) == (7, 150) and both.manifest["levels"] == {"quantization": "h1", "sparsity": "h2"}
    again = LatencyTable.open_or_build(tmp_path, {**base, "levels": {"sparsity": "h2"}}, measure, progress=False)
    assert calls == [None, ["sparsity"]] and again.linears == both.linears, "a table holding the kinds is reused"
    LatencyTable.open_or_build(tmp_path, {**base, "levels": {"quantization": "h3"}}, measure, progress=False)
    assert calls[-1] == ["quantization"], "new levels of a kind re-time that kind only"
    stored = LatencyTable.open(tmp_path, {**base, "levels": {}})[0]
    assert "8x8/quantization/3" not in stored.linears and stored.linears["8x8/quantization/1"] == 30
    assert stored.linears["8x8/sparsity/1"] == 30 and stored.manifest["levels"]["quantization"] == "h3"
    assert LatencyTable.open(tmp_path, {**base, "torch": "other", "levels": {}})[0] is None


def test_latency_entries_are_timed_in_interleaved_rounds_so_a_passing_load_hits_them_alike():
    """A load that starts part-way through the timing (here every call past the 45th costs twice as
    much) would make the entry timed last look twice as slow if entries were timed one after the
    other; timed in interleaved rounds, two equal calls get equal medians."""
    import time

    from optimum_evo.latency import time_calls

    calls = [0]

    def work():
        calls[0] += 1
        end = time.perf_counter() + (4e-4 if calls[0] > 45 else 2e-4)
        while time.perf_counter() < end:
            pass

    times = time_calls({"a": work, "b": work}, min_seconds=0.002, rounds=7)
    assert calls[0] > 60  # the load came: warm-up, then 7 rounds of about 9 calls each
    # timed one entry after the other, the ratio would be 2; 1.5 leaves room for a busy machine
    assert max(times.values()) / min(times.values()) < 1.5


def single_kind_under_budget(tiny_dir, out, *extra):
    """A single-kind search under 0.97 of the dense size: ``(report, reloaded model, its quantization
    config)``, after checking the checkpoint stores exactly the accounted bytes, within the budget."""
    import optimum_evo

    proc = run_cli(*common(tiny_dir, out, *extra, "--target-size", 0.97))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "result.json").read_text())
    stored = tensor_bytes(out / "model" / "model.safetensors")
    assert stored == report["profile"]["size_bytes"] <= int(0.97 * tensor_bytes(tiny_dir / "model.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    return report, reloaded, optimum_evo.check_evopress_model(reloaded)


def test_single_kind_under_a_size_budget_saves_that_kinds_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "out"
    report, _, qc = single_kind_under_budget(tiny_dir, out, "--compression", "quantization")
    stored = report["profile"]["size_bytes"]
    assert qc.compression == "quantization" and qc.profile["modules"]
    # its result seeds a joint search under the same budget: its units carry their kind already
    joint = tmp_path / "joint"
    proc = run_cli(*common(tiny_dir, joint, "--compression", "depth,quantization", "--target-size", stored,
                           "--init-from", out, "--eval-windows", 0, "--no-save-model"))
    assert proc.returncode == 0, proc.stderr
    seeded = json.loads((joint / "result.json").read_text())
    seed = seeded["initial_candidates"]["init_from"]
    assert seed[:len(seed) - len(report["levels"])] == [1] * (len(seed) - len(report["levels"]))  # every sub-block kept
    assert seeded["search"]["fitness"] <= report["search"]["fitness"] + 1e-9  # both over all 6 windows


def test_init_from_seeds_a_joint_search_with_a_single_kind_result(tiny_dir, tmp_path):
    quant = tmp_path / "quant"
    proc = run_cli(*common(tiny_dir, quant, "--compression", "quantization", "--target", 3, "--no-fused-groups", "--eval-windows", 0))
    assert proc.returncode == 0, proc.stderr
    q = json.loads((quant / "result.json").read_text())
    size = tensor_bytes(quant / "model" / "model.safetensors")
    joint = tmp_path / "joint"
    proc = run_cli(*common(tiny_dir, joint, "--compression", "depth,quantization", "--target-size", size,
                           "--init-from", quant, "--eval-windows", 0))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((joint / "result.json").read_text())
    seed = report["initial_candidates"]["init_from"]
    from optimum_evo.methods import get_method
    from optimum_evo.loading import load_model
    method = get_method("depth+quantization")
    space = method.space_from_report(load_model(str(tiny_dir), torch.float32), report)
    profile = space.profile(tuple(seed))
    # every sub-block kept, every linear at the quantization-only level or (filling the budget) above it
    assert all(u["level"] == "kept" for n, u in profile.items() if u["kind"] == "depth")
    assert all(profile[n]["kind"] == "quantization" and int(profile[n]["level"]) >= int(lv)
               for n, lv in q["levels"].items())
    assert space.costs.size_bytes(tuple(seed)) <= report["baseline_settings"]["budget"]["value"]
    # the seed is one of the starting points, so the search ends at least as good as it (the 6 calibration
    # windows are fewer tokens than every stage takes: each score is over all of them, exact)
    starts = list(dict.fromkeys([tuple(c) for n, c in report["initial_candidates"].items()
                                 if not n.startswith("random_best_of") and n != "init_from"] + [tuple(seed)]))
    seed_score = report["search"]["initial_scores"][starts.index(tuple(seed))]
    assert report["search"]["fitness"] <= seed_score + 1e-12


def test_init_from_seeds_a_joint_search_with_a_depth_result(tiny_dir, tmp_path):
    """A depth-only result seeds a joint search: its drops stay dropped, their linears off (level 0),
    the kept linears filled to the budget."""
    depth = tmp_path / "depth"
    proc = run_cli(*common(tiny_dir, depth, "--compression", "depth", "--target", 0.25, "--eval-windows", 0))
    assert proc.returncode == 0, proc.stderr
    d = json.loads((depth / "result.json").read_text())
    joint = tmp_path / "joint"
    proc = run_cli(*common(tiny_dir, joint, "--compression", "depth,quantization", "--target-size", 0.97,
                           "--init-from", depth, "--eval-windows", 0, "--no-save-model"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((joint / "result.json").read_text())
    from optimum_evo.loading import load_model
    from optimum_evo.methods import get_method

    space = get_method("depth+quantization").space_from_report(load_model(str(tiny_dir), torch.float32), report)
    seed = tuple(report["initial_candidates"]["init_from"])
    profile = space.profile(seed)
    dropped = {f"model.layers.{i}.self_attn" for i in d["profile"]["dropped_attention"]} | \
        {f"model.layers.{i}.mlp" for i in d["profile"]["dropped_mlp"]}
    assert dropped and {n for n, u in profile.items() if u["kind"] == "depth" and u["level"] == "dropped"} == dropped
    ls = space.level_space
    assert all(seed[u] == 0 for u, p in enumerate(ls.parents) if p >= 0 and ls.unit_names[p] in dropped)
    assert space.costs.size_bytes(seed) <= report["baseline_settings"]["budget"]["value"]


def test_init_from_continues_a_search_and_refuses_what_does_not_fit(tiny_dir, tmp_path):
    first = tmp_path / "first"
    assert run_cli(*common(tiny_dir, first, "--compression", "quantization", "--target", 3, "--eval-windows", 0, "--no-save-model")).returncode == 0
    done = json.loads((first / "result.json").read_text())
    again = tmp_path / "again"
    proc = run_cli(*common(tiny_dir, again, "--compression", "quantization", "--target", 3, "--eval-windows", 0, "--no-save-model",
                           "--init-from", first / "result.json"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((again / "result.json").read_text())
    assert report["initial_candidates"]["init_from"] == done["search"]["best"]
    assert report["search"]["fitness"] <= done["search"]["fitness"] + 1e-9  # both over all 6 windows
    # another target: refused, naming the fix; another kind: refused; no such file: refused before loading
    other = run_cli(*common(tiny_dir, tmp_path / "x", "--compression", "quantization", "--target", 2.5, "--eval-windows", 0, "--no-save-model",
                            "--init-from", first))
    assert other.returncode != 0 and "init_from" in other.stderr and "target" in other.stderr
    depth = run_cli(*common(tiny_dir, tmp_path / "y", "--compression", "depth", "--target", 0.25, "--eval-windows", 0,
                            "--no-save-model", "--init-from", first))
    assert depth.returncode != 0 and "init_from" in depth.stderr and "'quantization'" in depth.stderr
    missing = run_cli(*common(tiny_dir, tmp_path / "z", "--compression", "quantization", "--target", 3, "--init-from", tmp_path / "nothing"))
    assert missing.returncode != 0 and "init_from must be the result.json" in missing.stderr


def test_levels_of_different_kinds_are_not_ranked_by_their_errors():
    from optimum_evo.methods.joint import DENSE, _worth_their_cost

    # (kind, level, bytes, error): 50%+4 costs about a 3-bit level and has the higher database error
    options = [(DENSE, DENSE, 100, 0.0), ("q", 2, 20, 0.9), ("q", 3, 30, 0.1), ("q", 4, 40, 0.02),
               ("sq", "50%+4", 31, 0.15), ("sq", "60%+4", 27, 0.3), ("sq", "50%+3", 26, 0.35),
               ("q", "3g64", 33, 0.12), ("sq", "70%+4", 26, 0.5), ("q", 8, 110, 0.001)]
    kept = _worth_their_cost(options, 2)
    names = [o[1] for o in kept]
    # kept across kinds; dropped: 3g64 (3 bits cost less and do better), 8 bits (dense costs less),
    # 70%+4 (50%+3 costs the same with a lower error)
    assert names == [2, "50%+3", "60%+4", 3, "50%+4", 4, DENSE]
    assert all(a[2] < b[2] for a, b in zip(kept, kept[1:]))  # costs rise strictly
    # one kind: the Pareto front of cost and error, as before
    assert [o[1] for o in _worth_their_cost([o for o in options if o[0] in (DENSE, "q")], 2)] == [2, 3, 4, DENSE]


def test_sparse_quantized_levels_under_a_size_budget_save_what_they_accounted_reload_and_export(tiny_dir, tmp_path):
    from optimum_evo.exporters.from_result import compressed_model_from_result

    out = tmp_path / "sq"
    report, reloaded, qc = single_kind_under_budget(tiny_dir, out, "--compression", "sparse-quantization",
                                                    "--sparse-quant-levels", "50%+4,50%+3", "--export", "dense",
                                                    "--export", "compressed-tensors")
    assert qc.compression == "sparse-quantization" and set(qc.profile["modules"].values()) <= {"50%+4", "50%+3"}
    # show and the model card state the budget the search met (not the unused target)
    shown = run_cli("show", out / "model")
    assert "target 0.97 (target_size:" in shown.stdout and "'50%+" in shown.stdout, shown.stdout
    assert "| target | 0.97 (target_size:" in (out / "model" / "README.md").read_text()
    name = next(iter(qc.profile["modules"]))
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {f"{name}.qweight_mask", f"{name}.qweight_kept"} <= keys and f"{name}.qweight" not in keys
    weight = reloaded.get_submodule(name).dequantize_weight(torch.float32)
    assert (weight == 0).float().mean() >= 0.5
    rebuilt, _ = compressed_model_from_result(report)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reloaded(ids).logits
        assert torch.equal(expected, rebuilt(ids).logits)
        for fmt, tolerance in (("dense", 1e-4), ("compressed-tensors", 3e-2)):  # exported as plain bit widths
            plain = AutoModelForCausalLM.from_pretrained(out / f"export-{fmt}", dtype=torch.float32)
            assert (plain(ids).logits - expected).abs().max() < tolerance * expected.abs().max(), fmt
    # searched with bit widths: both kinds' levels on offer, the uniform sparse + quantized mixes among the baselines
    joint = tmp_path / "joint"
    proc = run_cli(*common(tiny_dir, joint, "--compression", "quantization,sparse-quantization",
                           "--sparse-quant-levels", "50%+4", "--target-size", 0.97, "--compare-baselines",
                           "--random-candidates", 2, "--eval-windows", 0))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((joint / "result.json").read_text())
    assert {"uniform", "dp", "sparse-quantization:50%+4"} <= set(report["initial_candidates"])
    assert {u["kind"] for u in report["levels"].values()} <= {"quantization", "sparse-quantization", "dense"}
    stored = tensor_bytes(joint / "model" / "model.safetensors")
    assert stored == report["profile"]["size_bytes"] <= report["baseline_settings"]["budget"]["value"]

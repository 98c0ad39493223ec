"""The package's structure: no import cycles, a core that never imports the integrations, a search
engine free of torch, no code outside the methods package that branches on a compression kind's
name, and registries that take a new compression method and a new export format from outside the
library (this file) through the command line, save_pretrained, reload and export."""

import ast
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

PACKAGE = Path(__file__).resolve().parents[1] / "optimum_evo"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set) -> set:
    """Every optimum_evo module ``name`` imports, at module level or inside functions, with relative
    imports resolved; ``from package import submodule`` counts as an import of the submodule;
    ``importlib.import_module(f"{__name__}.x")`` calls are not seen (registries load plugins so)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for n in ast.walk(block)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "optimum_evo")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "optimum_evo":
                continue
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known}
            if subs and len(subs) == len(node.names):
                out |= subs
            else:
                out.add(target)
                out |= subs
    return {m for m in out if m in known and m != name}


def import_graph() -> dict:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_function_level_and_relative_imports(tmp_path):
    graph = import_graph()
    assert "optimum_evo.methods.registry" in graph["optimum_evo.methods.depth"]  # relative, module level
    assert "optimum_evo.pipeline" in graph["optimum_evo.integrations.transformers.quantizer"]  # inside a function
    assert "optimum_evo.checkpoint" in graph["optimum_evo.integrations.transformers.quantizer"]  # from ... import m


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_a_cycle_is_detected():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


CORE = ("search", "methods", "compressors", "fitness", "data", "pipeline", "settings", "checkpoint", "record", "card",
        "decoder", "exporters", "correction", "loading", "embedded_models", "plotting", "utils", "version", "faults",
        "distributed", "latency")


def test_the_core_never_imports_the_integrations():
    graph = import_graph()
    offenders = {m: sorted(d for d in deps if d.startswith("optimum_evo.integrations"))
                 for m, deps in graph.items()
                 if m.split(".")[1:2] and m.split(".")[1] in CORE}
    assert {m: d for m, d in offenders.items() if d} == {}
    # every core module is covered by the list above
    top = {m.split(".")[1] for m in graph if m.count(".") >= 1}
    assert top - set(CORE) == {"integrations", "cli", "__main__"}


def test_hub_does_not_import_the_quantizer():
    assert not any("quantizer" in d for d in import_graph()["optimum_evo.integrations.hub"])


KIND_NAMES = ("depth", "sparsity", "quantization", "gguf", "sparse-quantization")


def test_no_code_outside_the_methods_package_compares_a_kind_name():
    """A kind's name compared (``== "sparsity"``, ``in ("sparsity", ...)``, ``compression == ...``)
    anywhere but in its method's module means a kind-specific branch outside the registry."""
    names = "|".join(KIND_NAMES)
    patterns = [re.compile(rf"""(==|!=)\s*["']({names})["']"""), re.compile(rf"""["']({names})["']\s*(==|!=)"""),
                re.compile(rf"""\bin\s*[(\[{{][^)\]}}]*["']({names})["']"""),
                re.compile(r"""\b(compression|kind)\s*(==|!=)\s*["']"""),
                re.compile(r"""\b(compression|kind)\s+(not\s+)?in\s*[(\[{]\s*["']""")]
    hits = []
    for path in PACKAGE.rglob("*.py"):
        if "methods" in path.relative_to(PACKAGE).parts:
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            if any(p.search(code) for p in patterns):
                hits.append(f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}")
    assert hits == []


def test_the_grep_catches_a_kind_branch(tmp_path):
    names = "|".join(KIND_NAMES)
    pattern = re.compile(rf"""(==|!=)\s*["']({names})["']""")
    assert pattern.search('if args.compression == "depth":') and not pattern.search('get_method(args.compression)')


def test_every_builtin_kind_and_format_is_found_through_its_registry():
    from optimum_evo.exporters import available_exporters, get_exporter
    from optimum_evo.methods import CompressionMethod, available_methods, get_method

    assert available_methods() == list(KIND_NAMES)
    assert all(isinstance(get_method(k), CompressionMethod) for k in KIND_NAMES)
    assert available_exporters() == ["dense", "gptq", "compressed-tensors", "gguf"]
    assert get_exporter("compressed_tensors").name == "compressed-tensors"
    assert get_exporter("gptq").refusal(get_method("depth")).startswith("--export gptq needs --compression quantization")
    assert get_exporter("dense").refusal(get_method("depth")) is None
    with pytest.raises(ValueError, match="Unknown compression 'rank'"):
        get_method("rank")


# ---------------------------------------------------------------------------- a kind and a format from outside
def _zero_half_method():
    """A small compression method defined here, on the public interface only: every linear of the
    decoder blocks either stays dense or keeps only its first half of output rows (the others
    exactly zero); the target is the fraction of linears halved."""
    from optimum_evo.methods import CompressedModelError, CompressionMethod
    from optimum_evo.search import LevelSpace, Stage

    class Space:
        def __init__(self, model, target):
            from optimum_evo.decoder import find_decoder_layout

            layout = find_decoder_layout(model)
            self.names = [f"{layout.path}.{i}.{n}" for i, layer in enumerate(layout.layers)
                          for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
            self.layer_of_unit = [int(n[len(layout.path) + 1:].split(".")[0]) for n in self.names]
            self.level_space = LevelSpace(tuple(self.names), (2,) * len(self.names), (0,) * len(self.names))
            self.target, self.k = target, round(target * len(self.names))
            self.modules = [model.get_submodule(n) for n in self.names]
            self.dense = [m.weight.detach().clone() for m in self.modules]

        @torch.no_grad()
        def apply(self, model, cand):
            for m, w, level in zip(self.modules, self.dense, cand):
                m.weight.copy_(w)
                if level:
                    m.weight[m.weight.shape[0] // 2:] = 0

        def restore(self, model):
            self.apply(model, (0,) * len(self.names))

        def describe(self, cand):
            return {"halved": sum(cand)}

    class ZeroHalf(CompressionMethod):
        name = "zero-half"
        description = "second half of output rows zeroed"
        target_help = "fraction of linears halved"
        presets = {p: dict(generations=3, offspring=3, stages=(Stage(1, 64),), init_tokens=64)
                   for p in ("fast", "paper", "superfast")}

        def validate(self, args):
            if not 0 < args.target < 1:
                raise ValueError("target must be a fraction of the linears to halve")

        def build_space(self, run, model):
            return Space(model, run.args.target)

        def baselines(self, run):
            n = run.space.level_space.num_units
            return {"first": tuple(int(i < run.space.k) for i in range(n))}, {}

        def space_from_report(self, model, report):
            return Space(model, report["arguments"]["target"])

        def materialize(self, model, space, candidate):
            space = Space(model, space.target)  # bound to the model being compressed
            space.apply(model, candidate)
            return {"halved": [n for n, lv in zip(space.names, candidate) if lv]}

        def verify(self, model, profile):
            for name in profile["halved"]:
                w = model.get_submodule(name).weight
                if bool(w[w.shape[0] // 2:].any()):
                    raise CompressedModelError(f"{name} should have its second half of rows zeroed.")

        def summary(self, profile):
            return {"halved linears": len(profile["halved"])}

    return ZeroHalf()


def _npz_exporter():
    from optimum_evo.exporters import Exporter

    class Npz(Exporter):
        name = "npz"
        description = "the weights as one numpy .npz file"
        loads_with = "numpy.load"

        def export(self, model, save_dir, tokenizer=None, **kwargs):
            import numpy as np

            save_dir = Path(save_dir)
            save_dir.mkdir(parents=True, exist_ok=True)
            np.savez(save_dir / "weights.npz", **{k: v.detach().float().cpu().numpy()
                                                    for k, v in model.state_dict().items()})
            return {"format": "npz", "path": str(save_dir)}

    return Npz()


@pytest.fixture
def registered():
    from optimum_evo.exporters import register_exporter, unregister_exporter
    from optimum_evo.methods import register_method, unregister_method

    method, exporter = register_method(_zero_half_method()), register_exporter(_npz_exporter())
    yield method, exporter
    unregister_method(method.name)
    unregister_exporter(exporter.name)


def test_a_new_kind_and_format_run_through_search_save_reload_and_export(registered, tmp_path, one_thread):
    import optimum_evo
    from test_hf_quantizer import CALIB, save_tiny
    from transformers import AutoModelForCausalLM

    from optimum_evo.cli import build_parser, main

    model_dir = save_tiny(tmp_path / "tiny")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(CALIB))
    search = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("search"))
    help_text = "".join(search.format_help().split())  # argparse wraps lines, also at hyphens
    assert "zero-half(fractionoflinearshalved)" in help_text and "npz" in help_text
    out = tmp_path / "out"
    rc = main(["search", "--model", str(model_dir), "--compression", "zero-half", "--target", "0.5", "--output",
               str(out), "--dataset", str(calib), "--num-samples", "4", "--seq-len", "32", "--eval-windows", "2",
               "--eval-seq-len", "32", "--top-k", "16", "--search-dtype", "float32", "--quiet", "--export", "npz",
               "--export", "dense"])
    assert rc == 0
    report = json.loads((out / "result.json").read_text())
    assert report["compression"] == "zero-half" and report["profile"]["halved"] == 14  # 28 linears, half halved
    assert (out / "export-npz" / "weights.npz").is_file()
    # the saved EvoPress checkpoint reloads (the method rebuilds nothing, verify checks the zeros)
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    qc = optimum_evo.check_evopress_model(reloaded)
    assert qc.compression == "zero-half" and len(qc.profile["halved"]) == 14
    plain = AutoModelForCausalLM.from_pretrained(out / "export-dense")
    ids = torch.tensor([[5, 9, 33, 40, 41, 70]])
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, plain(ids).logits)
    # save_pretrained of the reloaded model writes the same checkpoint again; export goes through the registry
    reloaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["profile"] == qc.profile
    summary = optimum_evo.export(reloaded, tmp_path / "again-npz", "npz")
    assert summary["format"] == "npz" and (tmp_path / "again-npz" / "weights.npz").is_file()


def test_search_engine_and_settings_stay_light():
    code = textwrap.dedent("""
        import sys
        import optimum_evo.search
        assert "torch" not in sys.modules, "the search engine imports torch"
        print("ok")
    """)
    import subprocess

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr


def test_every_builtin_space_implements_the_declared_protocol(tmp_path):
    from conftest import tiny_model

    from optimum_evo.compressors.database import LevelDatabase
    from optimum_evo.methods import SearchSpace
    from optimum_evo.methods.depth import DepthSpace
    from optimum_evo.methods.quantization import QuantizationSpace
    from optimum_evo.methods.sparsity import SparsitySpace

    model = tiny_model("llama")
    windows = torch.randint(0, 128, (2, 16))
    quant = LevelDatabase.build(model, windows, "quantization", [2, 4], tmp_path / "q", {"group_size": 32},
                                progress=False)
    sparse = LevelDatabase.build(model, windows, "sparsity",
                                 lambda name, shape: SparsitySpace.level_fractions(shape[0] * shape[1], 0.5, 64, 1),
                                 tmp_path / "s", progress=False)
    spaces = [DepthSpace(model, 0.34), QuantizationSpace(model, quant, 3.0), SparsitySpace(model, sparse, 0.5, 64, 1)]
    assert all(isinstance(space, SearchSpace) for space in spaces)
    assert not isinstance(object(), SearchSpace)


def test_a_run_inspects_the_decoder_layout_once_per_model(monkeypatch, tmp_path, one_thread):
    """Every stage asks find_decoder_layout; the layout of a model is found once and remembered."""
    from test_hf_quantizer import CALIB, char_tokenizer

    from conftest import tiny_model
    from optimum_evo import SearchArguments, decoder
    from optimum_evo.pipeline import compress

    calls = []
    real = decoder._inspect
    monkeypatch.setattr(decoder, "_inspect", lambda model: calls.append(id(model)) or real(model))
    model = tiny_model("llama")
    args = SearchArguments(model="tiny", compression="quantization", target=3.0, levels=[2, 4], group_size=32,
                           dataset=CALIB, generations=1, offspring=2, num_samples=2, seq_len=16, eval_windows=0,
                           top_k=8, search_dtype="float32", database_dir=str(tmp_path / "db"), progress=False)
    compress(args, model, char_tokenizer(), "tiny")
    assert calls and len(calls) == len(set(calls)), "a model's decoder layout was inspected more than once"


# Places that put a tensor in host memory on purpose, by (module, function): the reason is the rule.
HOST_ON_PURPOSE = {
    ("optimum_evo.fitness", "_keep"): "the prefix cache spills past its device budget to host memory",
    ("optimum_evo.pipeline.memory", "prefix_cache_budget"): "the spill budget is host memory",
    ("optimum_evo.compressors.offload", "__init__"): "a model with no resident weights runs on the CPU",
    ("optimum_evo.fitness", "build"): "the teacher cache lives in host memory; a window's rows move when scored",
    ("optimum_evo.data", "calibration_window_starts"): "window starts are host integers that index the text",
    ("optimum_evo.correction.train", "__getitem__"): "Trainer makes its batches on the host and moves them",
    ("optimum_evo.methods.sparsity", "owl_candidate"): "per-layer outlier scores, a few numbers",
    ("optimum_evo.methods.joint", "_decode_ns_each"): "latency tables time the CPU kernels of the target machine",
    ("optimum_evo.methods.joint", "_linear_runner"): "latency tables time the CPU kernels of the target machine",
    ("optimum_evo.methods.sparse_quantization", "timing_module"): "latency tables time the CPU kernels",
    ("optimum_evo.pipeline.stages", "fastest_dtype"): "it times the CPU's matrix products",
    ("optimum_evo.compressors.packed_linear", "from_linear"): "round-to-nearest on the host, then the layer moves",
    ("optimum_evo.exporters.compressed_tensors", "export_compressed_tensors"): "the shape tensor is file metadata",
    ("optimum_evo.exporters.gguf", "llama_permute"): "a row order (an index), valid on any device",
}
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "eye", "rand", "randn", "randint", "tensor", "linspace"}


def device_violations(path: Path, allowed: dict = HOST_ON_PURPOSE) -> list:
    """``.numpy()`` on anything but a ``.cpu()`` result (fails on a GPU tensor), a ``"cpu"`` device
    written into code (``.to("cpu")``, ``device="cpu"``, ``torch.device("cpu")``), and a tensor made
    by a ``torch`` factory without ``device=`` (it lands on the CPU, whatever the model's device;
    empty probes such as ``torch.empty(0)`` / ``torch.zeros(())`` aside) outside the functions of
    `HOST_ON_PURPOSE`: ``(module, function, line, what)``."""
    name = module_name(path) if path.is_relative_to(PACKAGE) else path.stem
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                attr = child.func.attr if isinstance(child.func, ast.Attribute) else None
                receiver = child.func.value if attr else None
                device = [k.value for k in child.keywords if k.arg == "device"]
                if attr == "numpy" and not (isinstance(receiver, ast.Call) and isinstance(
                        receiver.func, ast.Attribute) and receiver.func.attr == "cpu"):
                    found.append((name, inner, child.lineno, ".numpy() without .cpu()"))
                for v in list(child.args) + device if attr in ("to", "device") else device:
                    if isinstance(v, ast.Constant) and v.value == "cpu" and (name, inner) not in allowed:
                        found.append((name, inner, child.lineno, 'a "cpu" device in code'))
                if isinstance(receiver, ast.Name) and receiver.id == "torch" and attr in FACTORIES:
                    first = child.args[0] if child.args else None
                    probe = attr in ("zeros", "ones", "empty") and (
                        isinstance(first, ast.Tuple) and not first.elts or isinstance(first, ast.Constant) and first.value == 0)
                    if not probe and not device and (name, inner) not in allowed:
                        found.append((name, inner, child.lineno, f"torch.{attr} without device="))
            visit(child, inner)

    visit(tree, None)
    return found


def test_core_code_follows_the_models_device():
    """Device-agnostic code: no tensor is read into numpy without leaving its device first, and no
    tensor is put on the CPU except where host memory is the point (`HOST_ON_PURPOSE`)."""
    bad = [v for name, path in modules().items() if not name.startswith("optimum_evo.compressors.kernels")
           for v in device_violations(path)]
    assert not bad, "\n".join(f"{m}.{f} line {n}: {w}" for m, f, n, w in bad)
    hits = {(m, f) for path in modules().values() for m, f, _, _ in device_violations(path, allowed={})}
    assert not set(HOST_ON_PURPOSE) - hits, f"HOST_ON_PURPOSE names places that no longer use the CPU: " \
        f"{sorted(set(HOST_ON_PURPOSE) - hits)}"


def test_the_device_check_catches_numpy_and_cpu(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(t):\n    a = t.numpy()\n    b = t.cpu().numpy()\n    return t.to('cpu'), t.new_zeros(1, device='cpu')\n"
                   "def g(t):\n    return torch.zeros(3), torch.ones(3, device=t.device), torch.empty(0), torch.zeros(())\n")
    assert [(line, what) for _, _, line, what in device_violations(bad)] == [
        (2, ".numpy() without .cpu()"), (4, 'a "cpu" device in code'), (4, 'a "cpu" device in code'),
        (6, "torch.zeros without device=")]

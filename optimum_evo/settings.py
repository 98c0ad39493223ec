"""The settings of an EvoPress run, defined once.

`SearchArguments` is the single source of every setting: the command line
(``optimum-evo search``, ``optimum-cli evopress``) is generated from its fields,
`EvoPressConfig` takes the same fields (those marked ``config``), and
``transformers.HfArgumentParser(SearchArguments)`` parses it like any ``TrainingArguments``-style
dataclass. Each field carries its help text in ``metadata["help"]`` and its command-line details in
an `Option` inside ``Annotated``.

One vocabulary everywhere: ``dataset`` is the calibration text (as in transformers' ``GPTQConfig``),
``eval_dataset`` the evaluation text, ``database_dir`` the level database folder; the GPTQ settings
keep ``GPTQConfig``'s names (``sym``, ``desc_act``, ``damp_percent``) and ``modules_to_not_convert``
keeps transformers' meaning. ``eval_windows=0`` means "no evaluation" and ``None`` (``all`` on the
command line) "the whole evaluation text", in Python, in the config and on the command line. The
earlier names ``calibration``, ``evaluation`` and ``cache_dir`` still work and warn.

Examples:
    >>> args = SearchArguments(model="smollm2", compression="quantization", target=3.0, sym=True)  # doctest: +SKIP
    >>> from transformers import HfArgumentParser
    >>> (args,) = HfArgumentParser(SearchArguments).parse_args_into_dataclasses(
    ...     ["--compression", "sparsity", "--target", "0.5"])                                   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional, get_type_hints

from .data import BUILTIN_TEXTS, EVALUATION_ONLY

__all__ = ["DEPRECATED_NAMES", "Option", "SearchArguments", "config_fields", "option_of", "setting_fields"]

#: Earlier setting names that still work (with a ``FutureWarning``): old name -> current name.
DEPRECATED_NAMES = {"calibration": "dataset", "evaluation": "eval_dataset", "cache_dir": "database_dir"}


def init_report_path(value) -> Path:
    """The ``result.json`` that ``init_from`` names (the file, or the output folder holding it);
    ``ValueError`` when there is none."""
    path = Path(os.fspath(value)) if isinstance(value, (str, os.PathLike)) else None
    if path is not None and path.is_dir():
        path = path / "result.json"
    if path is None or not path.is_file():
        raise ValueError(f"init_from must be the result.json of an earlier search (or its output folder), got "
                         f"{value!r}: no such file.")
    return path


@dataclass(frozen=True)
class Option:
    """How a setting appears outside Python.

    Attributes:
        group: heading of the option in ``--help``.
        flags: command-line option strings (default: ``--name-with-dashes``).
        cli: whether the command line has the option.
        config: whether `EvoPressConfig` takes the setting.
        record: whether a compressed checkpoint's ``config.json`` records it (local folders of the
            run are not recorded: they mean nothing where the checkpoint is loaded).
        parse: converts the command-line string (default: the field's type).
        choices: fixed command-line choices (argparse refuses others).
        negate: for a ``True``-by-default flag, the option string that sets it to ``False``.
        append: the option may be repeated; each occurrence adds a value.
        metavar: placeholder in ``--help``.
    """

    group: str
    flags: tuple = ()
    cli: bool = True
    config: bool = True
    record: bool = True
    parse: Optional[Callable] = None
    choices: Optional[tuple] = None
    negate: Optional[str] = None
    append: bool = False
    metavar: Optional[str] = None


def _int_list(text: str) -> list:
    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers such as 2,3,4, got {text!r}") from None


def _str_list(text: str) -> list:
    return [x.strip() for x in str(text).split(",") if x.strip()]


def _windows(text: str):
    if str(text).strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected a number of windows or 'all', got {text!r}") from None


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


_CALIBRATION_TEXTS = ", ".join(k for k in BUILTIN_TEXTS if k not in EVALUATION_ONLY)


@dataclass
class SearchArguments:
    """Everything an EvoPress run needs; invalid values fail here, before any model is loaded.

    The fields are grouped as on the command line (``optimum-evo search --help``); each field's
    help text is in its ``metadata``. The compression-specific ones (``mode``; ``levels``,
    ``group_size``, ``sym``, ``desc_act``, ``damp_percent``, ``mse``; ``sparsity_step``,
    ``max_offset``) are validated by the compression method (`optimum_evo.methods`).

    Examples:
        >>> SearchArguments(compression="depth", target=0.25).eval_windows
        40
    """

    # -- model and output
    model: Annotated[str, Option("model", flags=("-m", "--model"), config=False)] = _setting(
        "smollm2", "embedded model name (smollm2, gemma3), local folder or Hub id")
    output_dir: Annotated[Optional[str], Option("model", flags=("--output", "--output-dir"), record=False)] = _setting(
        None, "output folder: compressed model, result.json, plots, search checkpoint and teacher cache")

    # -- what to compress
    compression: Annotated[str, Option("compression", metavar="KIND[,KIND]")] = _setting(
        "depth", "compression method: depth, sparsity, quantization, gguf or sparse-quantization (see "
                 "optimum_evo.methods); several, comma-separated (a list in Python), are searched together under "
                 "target_size or target_speedup")
    target: Annotated[float, Option("compression")] = _setting(
        0.25, "depth: fraction of sub-blocks to drop; sparsity: fraction of weights to prune; quantization: "
              "average bits over the searched linears")
    target_size: Annotated[Optional[str], Option("compression", metavar="SIZE")] = _setting(
        None, "joint search budget: bytes the compressed model's weights take as stored, e.g. 60MB, 57MiB, "
              "a number of bytes, or a fraction of the dense size such as 0.25")
    target_speedup: Annotated[Optional[float], Option("compression", metavar="X")] = _setting(
        None, "joint search budget: decode this many times faster than the dense model on this machine (a "
              "latency table is measured once)")
    latency_dir: Annotated[Optional[str], Option("compression", record=False)] = _setting(
        None, "latency table folder of target_speedup (default: a shared cache keyed by model and dtype)")
    mode: Annotated[Literal["separate", "block"], Option("compression", choices=("separate", "block"))] = _setting(
        "separate", "depth units: attention and MLP sub-blocks separately, or whole blocks")
    levels: Annotated[Optional[list[int]], Option("compression", parse=_int_list, metavar="BITS")] = _setting(
        None, "quantization bit widths to choose from, comma-separated (default 2,3,4,5,6,8)")
    gguf_types: Annotated[Optional[list[str]], Option("compression", parse=_str_list, metavar="TYPES")] = _setting(
        None, "gguf: the GGUF tensor types to choose from, comma-separated (default Q2_K,Q3_K,IQ4_NL,Q4_K,Q5_K,Q6_K,"
              "Q8_0)")
    sparse_quant_levels: Annotated[Optional[list[str]], Option("compression", parse=_str_list,
                                                               metavar="LEVELS")] = _setting(
        None, "sparse-quantization: the sparse + quantized levels to choose from, comma-separated, each the percent "
              "of weights pruned, a percent sign, '+' and the bits of the rest (default: half pruned + 3 bits, 60 "
              "percent + 4, half + 4); a SparseGPT mask, then GPTQ of the kept weights at the group_size")
    group_size: Annotated[int, Option("compression")] = _setting(
        128, "quantization: input columns per scale / zero-point group (0 = one group per row)")
    sym: Annotated[bool, Option("compression")] = _setting(
        False, "quantization: symmetric grids (zero-point at the middle of the range), as GPTQConfig's sym")
    desc_act: Annotated[bool, Option("compression")] = _setting(
        False, "quantization: GPTQ act-order (columns by decreasing Hessian diagonal), as GPTQConfig's desc_act")
    damp_percent: Annotated[float, Option("compression")] = _setting(
        0.01, "GPTQ / SparseGPT damping, as a fraction of the mean Hessian diagonal (GPTQConfig's damp_percent)")
    mse: Annotated[float, Option("compression")] = _setting(
        0.0, "quantization: search each group's clipping range to minimise the p-norm rounding error with this "
             "p (2.4 as in GPTQ's reference; 0 = min-max range)")
    builder: Annotated[str, Option("compression", choices=("gptq", "gptq-sequential", "quantease", "signround"))] = \
        _setting("gptq", "quantization: how the levels are made: gptq (each linear on the dense model's activations), "
                         "gptq-sequential (on the activations of the model quantized so far), quantease (GPTQ then "
                         "coordinate descent), signround (rounding and clipping tuned on each block's output, as "
                         "AutoRound); see optimum_evo.compressors.builders")
    builder_iters: Annotated[Optional[int], Option("compression")] = _setting(
        None, "quantization: iterations of the signround builder (default 200) or coordinate-descent passes of "
              "quantease (default 3)")
    builder_stream: Annotated[str, Option("compression", metavar="STREAM")] = _setting(
        "level", "quantization: the calibration stream the sequential builders (gptq-sequential, quantease, "
                 "signround) tune each block on: level (the model quantized at the level being built, one stream "
                 "per level), target (all levels on the stream of the model quantized at the level nearest the "
                 "target), dense (the dense model's activations) or a level such as 3")
    retune: Annotated[bool, Option("compression")] = _setting(
        False, "quantization: after the search, make the chosen levels again in one pass of the builder on the "
               "chosen model's own calibration activations (what the database cannot know: each linear's real "
               "neighbours); costs about one database level")
    group_sizes: Annotated[Optional[list[int]], Option("compression", parse=_int_list, metavar="SIZES")] = _setting(
        None, "quantization: also build levels at these group sizes (comma-separated, e.g. 64,128); the search then "
              "picks bits and group size per linear under the stored bits (codes, scales, zeros) of the uniform "
              "target-bit model at group_size")
    fused_groups: Annotated[bool, Option("compression", negate="--no-fused-groups")] = _setting(
        True, "quantization: linears that read the same input (q/k/v, gate/up: found by tracing one forward) share "
              "one bit width, the groups vLLM and llama.cpp run as one fused matmul; the average bits stay exact")
    sparsity_step: Annotated[float, Option("compression")] = _setting(
        0.05, "sparsity levels are spaced by this fraction of the median linear's weights")
    max_offset: Annotated[int, Option("compression")] = _setting(
        5, "sparsity levels either side of the target")
    modules: Annotated[Optional[str], Option("compression", metavar="REGEX")] = _setting(
        None, "regular expression (re.search on module names) restricting a sparsity / quantization search to "
              "some linears of the decoder blocks; the others stay dense")
    modules_to_not_convert: Annotated[Optional[list[str]], Option("compression", parse=_str_list,
                                                                  metavar="NAMES")] = _setting(
        None, "linears left dense: a module is skipped when one of these strings is part of its name, as in "
              "transformers (comma-separated on the command line)")
    database_dir: Annotated[Optional[str], Option("compression", record=False)] = _setting(
        None, "level database folder (default: a shared cache keyed by model, data and settings)")
    database_device: Annotated[Optional[str], Option("compression", record=False)] = _setting(
        None, "device the level database is built on, one decoder block at a time (default: the model's; "
              "e.g. cuda for a model held in host memory)")

    # -- search
    preset: Annotated[str, Option("search")] = _setting(
        "fast", "search preset: fast (CPU), paper (the reference defaults) or superfast")
    generations: Annotated[Optional[int], Option("search")] = _setting(None, "override the preset's generations")
    offspring: Annotated[Optional[int], Option("search")] = _setting(None, "override the preset's offspring")
    confirm_tokens: Annotated[Optional[int], Option("search")] = _setting(
        None, "re-score a child that beat the parent on this many fresh tokens before accepting it")
    structure_moves: Annotated[Literal["uniform", "adaptive"], Option("search", choices=("uniform", "adaptive"))] = (
        _setting("uniform", "joint search: share of mutations that drop or restore sub-blocks: that of the "
                            "sub-blocks among the units (uniform) or adapted per generation (adaptive)"))
    init: Annotated[Literal["baselines", "random"], Option("search", choices=("baselines", "random"))] = _setting(
        "baselines", "initial parent: the best baseline by KL, or the best of random candidates (the paper)")
    init_from: Annotated[Optional[str], Option("search", metavar="RESULT", record=False)] = _setting(
        None, "also start from what an earlier search found: its result.json (or its output folder), of the same "
              "method or, for a joint search, of one of its kinds (e.g. the quantization-only result at the same "
              "size); fitted to this run's budget")
    random_candidates: Annotated[int, Option("search")] = _setting(
        16, "random candidates for init=random and for the best-of-N random baseline")
    compare_baselines: Annotated[bool, Option("search")] = _setting(
        False, "also evaluate the baselines (ShortGPT, sliding-window cosine, uniform, OWL, DP, best-of-N random)")
    seed: Annotated[int, Option("search")] = _setting(0, "seed of calibration sampling and of the search")

    # -- calibration and fitness
    dataset: Annotated[Optional[str], Option("calibration")] = _setting(
        "brown", f"calibration text: a built-in name ({_CALIBRATION_TEXTS}), a text file, a dataset name; in "
                 "Python also a list of strings or a datasets.Dataset (never the evaluation text)")
    num_samples: Annotated[int, Option("calibration")] = _setting(128, "calibration windows")
    seq_len: Annotated[int, Option("calibration")] = _setting(512, "tokens per calibration window")
    fitness: Annotated[Literal["topk", "full"], Option("calibration", choices=("topk", "full"))] = _setting(
        "topk", "teacher cache: top-K log-probabilities (4.1 kB per token at K=512) or the full vocabulary")
    top_k: Annotated[int, Option("calibration")] = _setting(512, "K of the top-K KL")
    search_dtype: Annotated[Literal["auto", "float32", "bfloat16"], Option(
        "calibration", choices=("auto", "float32", "bfloat16"))] = _setting(
        "auto", "dtype of the model scored during the search (auto: on a CPU the faster of float32 and bfloat16 "
        "on this machine; on an accelerator the model's own dtype, so no copy is made)")
    reuse_prefix: Annotated[bool, Option("calibration", negate="--no-prefix-reuse")] = _setting(
        True, "reuse the parent's activations of the unchanged prefix of a child")
    prefix_cache_size: Annotated[Optional[str], Option("calibration", record=False)] = _setting(
        None, "memory the prefix reuse may hold: a size (8GB) or a fraction of the free memory of the model's "
              "device (default 0.5; on a GPU, what does not fit spills to host memory, up to half of its free memory)")

    # -- evaluation
    eval_dataset: Annotated[Optional[str], Option("evaluation")] = _setting(
        "wikitext2", "evaluation text (default: the WikiText-2 test set)")
    eval_windows: Annotated[Optional[int], Option("evaluation", parse=_windows, metavar="N|all")] = _setting(
        40, "evaluation windows (0 = no evaluation; None, or all on the command line = the whole text)")
    eval_seq_len: Annotated[int, Option("evaluation")] = _setting(512, "tokens per evaluation window")
    eval_dtype: Annotated[Literal["float32", "bfloat16"], Option("evaluation", choices=("float32", "bfloat16"),
                                                                config=False)] = _setting(
        "float32", "dtype of the final evaluation and of the saved model")

    # -- LoRA error correction
    lora_correction: Annotated[int, Option("correction", metavar="RANK")] = _setting(
        0, "after a sparsity / quantization search, add LoRA error-correction adapters of this rank (saved in "
           "OUTPUT/model/lora-correction; 0 = none)")
    lora_method: Annotated[Literal["eora", "svd"], Option("correction", choices=("eora", "svd"))] = _setting(
        "eora", "closed-form correction method")
    lora_inputs: Annotated[Literal["dense", "compressed", "auto"], Option(
        "correction", choices=("dense", "compressed", "auto"))] = _setting(
        "dense", "activation statistics of the dense or the compressed model, or auto: both, keep the one with the "
                 "lower KL on held-out calibration windows")
    lora_train_steps: Annotated[int, Option("correction")] = _setting(
        0, "KL-distillation steps after the closed form (0 = closed form only)")
    lora_learning_rate: Annotated[float, Option("correction")] = _setting(5e-4, "learning rate of the distillation")
    lora_param_budget: Annotated[Optional[int], Option("correction", metavar="N")] = _setting(
        None, "total adapter parameters, allocated where they remove the most error (ranks <= lora_correction)")

    # -- what the run writes
    save_model: Annotated[bool, Option("output", negate="--no-save-model", config=False)] = _setting(
        True, "save the compressed model in OUTPUT/model")
    export: Annotated[Optional[list[str]], Option("output", append=True, config=False, metavar="FORMAT")] = _setting(
        None, "also write the result in a format that loads without optimum-evo, in OUTPUT/export-FORMAT "
              "(repeatable; formats: see optimum_evo.exporters)")
    progress: Annotated[bool, Option("output", negate="--quiet")] = _setting(True, "show progress bars")

    def __post_init__(self):
        self._validate_common()
        from .methods import available_methods, get_method

        from .methods.registry import run_method

        method = run_method(self)
        method.validate(self)
        if self.export is not None:  # the formats themselves are checked by the pipeline, before any model loads
            if isinstance(self.export, str) or not all(isinstance(f, str) for f in self.export):
                raise ValueError(f"export must be a list of format names, got {self.export!r}.")
            self.export = list(self.export)
        if self.lora_correction and not method.correctable:
            names = " and ".join(m for m in available_methods() if get_method(m).correctable)
            raise ValueError(f"lora_correction applies to {names}: {self.compression} compression leaves no "
                             "per-linear compression residual to correct.")

        if not isinstance(self.retune, bool):
            raise ValueError(f"retune must be True or False, got {self.retune!r}.")
        if self.retune and not method.refinable:
            names = " and ".join(m for m in available_methods() if get_method(m).refinable)
            raise ValueError(f"retune applies to {names} compression (it re-makes the chosen levels of a level "
                             f"database); {self.compression} has nothing to re-tune: drop retune.")

    # ------------------------------------------------------------------ validation
    def _validate_common(self) -> None:
        from .methods.registry import canonical_compression

        self.compression = canonical_compression(self.compression)
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)):
            raise ValueError(f"target must be a number, got {self.target!r}.")
        if self.preset not in ("fast", "paper", "superfast"):
            raise ValueError(f"Unknown preset {self.preset!r}; choose one of ['fast', 'paper', 'superfast'].")
        if self.modules is not None:
            try:
                re.compile(self.modules)
            except (re.error, TypeError) as e:
                raise ValueError(f"modules must be a regular expression over module names, got {self.modules!r}: {e}.")
        if self.modules_to_not_convert is not None:
            if isinstance(self.modules_to_not_convert, str) or not all(
                    isinstance(m, str) and m for m in self.modules_to_not_convert):
                raise ValueError("modules_to_not_convert must be a list of module names (or parts of names), got "
                                 f"{self.modules_to_not_convert!r}.")
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        for name in ("num_samples", "seq_len", "top_k", "eval_seq_len", "random_candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.seq_len < 2:
            raise ValueError("seq_len must be at least 2 tokens.")
        for name in ("generations", "offspring", "confirm_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < (0 if name == "generations" else 1)):
                raise ValueError(f"{name} must be positive, got {value!r}.")
        if self.eval_windows is not None and (isinstance(self.eval_windows, bool) or not isinstance(
                self.eval_windows, int) or self.eval_windows < 0):
            raise ValueError(f"eval_windows must be a non-negative integer (0 = no evaluation, None = the whole "
                             f"evaluation text), got {self.eval_windows!r}.")
        if self.prefix_cache_size is not None:
            from .utils import parse_size

            parse_size(self.prefix_cache_size, "prefix_cache_size", "the free memory")
        if self.database_device is not None:
            import torch

            try:
                device = torch.device(self.database_device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"database_device={self.database_device!r} is not a torch device (cpu, cuda, "
                                 "cuda:1, xpu, mps).") from e
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"database_device={self.database_device!r} but torch sees no CUDA device here; "
                                 "leave database_device unset to build on the model's device.")
        for name, allowed in (("fitness", ("topk", "full")), ("init", ("baselines", "random")),
                              ("structure_moves", ("uniform", "adaptive")),
                              ("mode", ("separate", "block")), ("search_dtype", ("auto", "float32", "bfloat16")),
                              ("eval_dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        if self.lora_correction:
            if isinstance(self.lora_correction, bool) or not isinstance(self.lora_correction, int) \
                    or self.lora_correction < 0 or self.lora_train_steps < 0:
                raise ValueError("lora_correction (a rank) and lora_train_steps must be >= 0.")
            if self.lora_param_budget is not None and (isinstance(self.lora_param_budget, bool) or not isinstance(
                    self.lora_param_budget, int) or self.lora_param_budget <= 0):
                raise ValueError(f"lora_param_budget must be a positive number of adapter parameters, got "
                                 f"{self.lora_param_budget!r}.")
            if self.lora_method not in ("eora", "svd") or self.lora_inputs not in ("dense", "compressed", "auto"):
                raise ValueError("lora_method must be 'eora' or 'svd' and lora_inputs 'dense', 'compressed' or "
                                 "'auto'.")
            if not isinstance(self.lora_learning_rate, (int, float)) or isinstance(self.lora_learning_rate, bool) \
                    or not self.lora_learning_rate > 0:
                raise ValueError(f"lora_learning_rate must be a positive number, got {self.lora_learning_rate!r}.")
        if self.init_from is not None:
            init_report_path(self.init_from)
        self._validate_dataset()

    def _validate_dataset(self) -> None:
        source = self.dataset
        if source is not None and not isinstance(source, (str, os.PathLike, list, tuple)) \
                and not type(source).__module__.startswith("datasets"):
            raise ValueError(f"dataset must be a name, a file path or a list of strings (or a datasets.Dataset), got "
                             f"{type(source).__name__}.")
        if isinstance(source, str) and source in EVALUATION_ONLY:
            raise ValueError(f"dataset={source!r} is the evaluation text; calibrate on "
                             f"{sorted(set(BUILTIN_TEXTS) - EVALUATION_ONLY)} or your own text.")
        if isinstance(source, (list, tuple)):
            if not all(isinstance(t, str) for t in source):
                raise ValueError("dataset must be a name, a file path or a list of strings.")
            if not any(t.strip() for t in source):
                raise ValueError("The dataset text is empty: give at least one non-empty document.")
        if isinstance(source, str) and Path(source).is_file() \
                and not Path(source).read_text(errors="replace").strip():
            raise ValueError(f"The dataset file {source!r} is empty.")
        if isinstance(source, str) and source not in BUILTIN_TEXTS and not Path(source).exists() and (
                os.sep in source or Path(source).suffix in (".txt", ".json", ".jsonl", ".csv", ".parquet")):
            raise ValueError(f"The dataset file {source!r} does not exist; give an existing text file, a built-in "
                             f"name ({_CALIBRATION_TEXTS}) or a dataset name.")

    # ------------------------------------------------------------------ views
    def search_config(self, space=None):
        """The `SearchConfig` of this run (the method's preset with the
        overrides above; ``space`` resolves presets that depend on the space size)."""
        from .methods.registry import run_method

        return run_method(self).search_config(self, space)

    def to_dict(self) -> dict:
        """JSON-serializable settings (a calibration text given as an object is named by its type)."""
        d = dataclasses.asdict(self)
        for key in ("dataset", "eval_dataset"):
            if not isinstance(d[key], (str, type(None))):
                d[key] = f"<{type(getattr(self, key)).__name__}>"
        return d


def _accept_deprecated_names(cls):
    """Let ``cls(calibration=...)`` etc. work with a ``FutureWarning`` (see `DEPRECATED_NAMES`)."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for old, new in DEPRECATED_NAMES.items():
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"Pass {new}= only; {old}= is its deprecated name.")
                warnings.warn(f"{old}= is deprecated; use {new}=.", FutureWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


SearchArguments = _accept_deprecated_names(SearchArguments)


@functools.lru_cache(maxsize=None)
def _hints() -> dict:
    return get_type_hints(SearchArguments, include_extras=True)


def option_of(name: str) -> Option:
    """The `Option` of a field."""
    return _hints()[name].__metadata__[0]


def setting_fields() -> list:
    """The fields of `SearchArguments`, in order."""
    return list(dataclasses.fields(SearchArguments))


def config_fields() -> list:
    """Names of the settings `EvoPressConfig` takes."""
    return [f.name for f in setting_fields() if option_of(f.name).config]


def recorded_fields() -> list:
    """Names of the settings a compressed checkpoint's ``config.json`` records."""
    return [name for name in config_fields() if option_of(name).record]

"""Export an EvoPress model as **GGUF** for llama.cpp (and transformers' ``gguf_file=`` loader), one
tensor type per tensor, taken from the profile.

A packed linear keeps its own codes where a GGUF type can hold them. GGUF's legacy types are blocks of
32 input columns with one float16 scale (``Q4_0``, ``Q5_0``, ``Q8_0``: symmetric, ``w = d * (q - 2**(b-1))``)
or a scale and a minimum (``Q4_1``, ``Q5_1``: ``w = d * q + m``). Any group size that is a multiple of 32
splits into such blocks with the same scale, so:

| our layer | GGUF type | values |
|---|---|---|
| symmetric, 2..4 bits | ``Q4_0`` | exact (the codes shifted to the middle of the 4-bit range) |
| symmetric, 5 bits | ``Q5_0`` | exact |
| symmetric, 6..8 bits | ``Q8_0`` | exact |
| asymmetric, 2..4 / 5 bits | ``Q4_1`` / ``Q5_1`` | ``m = -scale * zero`` rounded to float16 (max error reported) |
| anything else (asymmetric 6..8 bits, act-order, groups not a multiple of 32) | ``fallback`` | the dequantized weight in ``fallback`` (``F16`` by default; ``Q8_0`` re-quantizes) |

Linears that are not packed (dense or sparse) and the token embedding are written in ``dense_type``
(``F16`` by default), norms in ``F32``. Removed decoder blocks are simply absent (``block_count`` is the
number kept); attention-only / MLP-only drops cannot be expressed in llama.cpp's ``llama`` architecture
and are refused (export them with the ``dense`` format, or search with ``mode="block"``).

GGUF's 2- and 3-bit types are K-quants (256-weight super-blocks with quantized sub-block scales): a
2- or 3-bit layer lands in ``Q4_0`` / ``Q4_1`` here, exact but at 4.5 / 5 bits per weight. For the
smallest files, quantize with ``sym=True, group_size=32`` and levels 4, 5, 8 (the exact ``Q4_0`` /
``Q5_0`` / ``Q8_0`` grids), so what the search scored is what llama.cpp runs.

Architectures: llama (and mistral), qwen2, qwen3, gemma3 (llama.cpp's names; q/k rows are permuted
for llama as llama.cpp's converter does; gemma's norms are stored as ``1 + weight``). The tokenizer
is written for byte-level BPE tokenizers (``tokenizer.ggml.model = "gpt2"``, merges and special
tokens from ``tokenizer.json``) and SentencePiece BPE ones (``"llama"``: pieces, scores from the merge
order, byte tokens).

Examples:
    >>> from optimum_evo.exporters import export
    >>> summary = export(model, "out/gguf", "gguf", tokenizer=tok)          # doctest: +SKIP
    >>> summary["types"]                                                    # doctest: +SKIP
    {'Q4_0': 150, 'Q8_0': 60, 'F16': 1, 'F32': 61}
    >>> from transformers import AutoModelForCausalLM
    >>> AutoModelForCausalLM.from_pretrained("out/gguf", gguf_file="model.gguf")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..data import tokenizer_adds_bos
from ..decoder import find_decoder_layout
from ..version import __version__
from .base import Exporter, register_exporter
from .common import ExportError, build_plain_model, model_contents, source_tokenizer

logger = logging.getLogger(__name__)

#: transformers ``model_type`` -> (llama.cpp architecture, q/k rows permuted as llama.cpp's converter does)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "qwen3": ("qwen3", False), "gemma3_text": ("gemma3", False), "gemma3": ("gemma3", False)}
#: llama.cpp's gemma3 graph: every 6th layer global, local layers' rotary base 10000
GEMMA3_SWA_PATTERN, GEMMA3_LOCAL_THETA = 6, 10000.0
#: llama.cpp architecture -> the one of its graphs that reads per-layer head counts and FFN widths, 0
#: meaning "no attention" / "no FFN" (``deci``, made for Nemotron-NAS models, is Llama's graph otherwise)
PARTIAL_DROPS = {"llama": "deci"}
DENSE_TYPES = ("F16", "BF16", "F32", "Q8_0")
FILE_NAME = "model.gguf"


# ============================================================================ block packing
def _blocks(values: torch.Tensor) -> torch.Tensor:
    """``[rows, in]`` -> ``[rows, in / 32, 32]``."""
    rows, cols = values.shape
    return values.reshape(rows, cols // 32, 32)


def _half_bytes(x: torch.Tensor) -> np.ndarray:
    """float16 values as their little-endian bytes, ``[..., 2]``."""
    return x.to(torch.float16).contiguous().cpu().numpy().view(np.uint8).reshape(*x.shape, 2)


def _nibbles(q: torch.Tensor) -> np.ndarray:
    """ggml's 4-bit layout: byte ``j`` of a block holds element ``j`` (low) and ``j + 16`` (high)."""
    q = q.to(torch.uint8)
    return (q[..., :16] | (q[..., 16:] << 4)).cpu().numpy()


def _high_bits(q: torch.Tensor) -> np.ndarray:
    """ggml's 5-bit high-bit word: bit ``j`` of a little-endian uint32 is bit 4 of element ``j``."""
    bits = ((q.to(torch.int64) >> 4) & 1) << torch.arange(32, device=q.device)
    return bits.sum(-1).to(torch.int64).cpu().numpy().astype("<u4").view(np.uint8).reshape(*q.shape[:-1], 4)


def pack_blocks(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, qtype: str) -> np.ndarray:
    """Pack per-block ``codes`` (``[rows, in]``, already in the type's unsigned range), block scales
    ``d`` and block minimums ``m`` (``[rows, in / 32]``) into GGUF bytes ``[rows, bytes per row]``."""
    q = _blocks(codes)
    parts = [_half_bytes(d)]
    if qtype in ("Q4_1", "Q5_1"):
        parts.append(_half_bytes(m))
    if qtype in ("Q5_0", "Q5_1"):
        parts.append(_high_bits(q))
    if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        parts.append(_nibbles(q & 0x0F))
    elif qtype == "Q8_0":
        parts.append((q.to(torch.int16) - 128).to(torch.int8).cpu().numpy().view(np.uint8))
    else:
        raise ValueError(f"pack_blocks does not write {qtype}.")
    out = np.concatenate([p.reshape(*q.shape[:2], -1) for p in parts], axis=-1)
    return np.ascontiguousarray(out.reshape(q.shape[0], -1))


def _exact_type(data, in_features: int) -> tuple | None:
    """``(type, codes, d, m)`` holding the quantized layer ``data`` in GGUF blocks, or ``None``."""
    gs = data.group_size if data.group_size and data.group_size > 0 else in_features
    trivial = torch.equal(data.g_idx.long(), torch.arange(in_features, device=data.g_idx.device) // gs)
    if in_features % 32 or gs % 32 or not trivial:
        return None
    per_block = gs // 32
    scales = data.scales.float().repeat_interleave(per_block, dim=1)  # [rows, in / 32]
    zeros = data.zeros.float().round().repeat_interleave(per_block, dim=1)
    codes = data.codes.to(torch.int64)
    sym = bool((data.zeros == (1 << (data.bits - 1))).all())
    if sym:
        qtype, width = ("Q4_0", 4) if data.bits <= 4 else ("Q5_0", 5) if data.bits == 5 else ("Q8_0", 8)
        shift = (1 << (width - 1)) - (1 << (data.bits - 1))
        return qtype, codes + shift, scales, None
    if data.bits > 5:
        return None
    qtype = "Q4_1" if data.bits <= 4 else "Q5_1"
    return qtype, codes, scales, -scales * zeros


def _torch_dtype_array(t: torch.Tensor, qtype: str) -> tuple:
    """A dense tensor as ``(array, raw type or None, type written)`` in ``qtype`` (F32 / F16 / BF16 /
    Q8_0; a tensor Q8_0 cannot hold, not 2-D or with rows not a multiple of 32, is written F16)."""
    import gguf

    t = t.detach().float().cpu()
    if qtype == "F32":
        return t.cpu().numpy(), None, "F32"
    if qtype == "F16" or (qtype == "Q8_0" and (t.dim() != 2 or t.shape[-1] % 32)):
        return t.to(torch.float16).cpu().numpy(), None, "F16"
    if qtype in ("BF16", "Q8_0"):
        kind = getattr(gguf.GGMLQuantizationType, qtype)
        return gguf.quants.quantize(t.cpu().numpy(), kind), kind, qtype
    raise ValueError(qtype)


# ============================================================================ llama.cpp conventions
def llama_permute(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives ``q_proj`` / ``k_proj`` of llama models (rotary halves
    interleaved): output row ``r`` of the GGUF tensor is row ``perm[r]`` of ours."""
    idx = torch.arange(rows)
    return idx.reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def _rope_theta(config, layer_type: str = "full_attention") -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and isinstance(rope.get(layer_type), dict):  # per layer type (gemma3)
        rope = rope[layer_type]
    if isinstance(rope, dict) and rope.get("rope_type", "default") not in ("default", None):
        raise ExportError(f"GGUF export writes the default rotary embedding; this model uses "
                          f"{rope.get('rope_type')!r} scaling. Export with 'dense' and convert with llama.cpp's "
                          "convert_hf_to_gguf.py.")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", None) or 10000.0)


def _check_gemma3(config) -> None:
    """Refuse gemma3 settings llama.cpp's gemma3 graph does not have."""
    layer_types = list(getattr(config, "layer_types", None) or [])
    expected = ["full_attention" if (i + 1) % GEMMA3_SWA_PATTERN == 0 else "sliding_attention"
                for i in range(len(layer_types))]
    problems = []
    if layer_types != expected:
        problems.append(f"layer_types other than every {GEMMA3_SWA_PATTERN}th layer global")
    if _rope_theta(config, "sliding_attention") != GEMMA3_LOCAL_THETA:
        problems.append(f"a local rotary base other than {GEMMA3_LOCAL_THETA:g}")
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, name, None) is not None:
            problems.append(name)
    if getattr(config, "use_bidirectional_attention", False):
        problems.append("bidirectional attention")
    if problems:
        raise ExportError(f"llama.cpp's gemma3 architecture has no {', '.join(problems)}; export with 'dense' "
                          "instead.")


def _metadata(writer, config, arch: str, blocks: int, kept: dict) -> None:
    """The hyper-parameters; with ``kept`` (per block, whether its attention / FFN is written) not all
    true, head counts and FFN widths per layer, 0 where that half is dropped."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(blocks))
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    ffn = int(config.intermediate_size)
    if all(kept["attn"]) and all(kept["ffn"]):
        writer.add_feed_forward_length(ffn)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
    else:  # see `_partial_drop_stand_ins` for the width-1 FFNs and block 0's heads
        writer.add_feed_forward_length([ffn if k else 1 for k in kept["ffn"]])
        writer.add_head_count([heads if k or i == 0 else 0 for i, k in enumerate(kept["attn"])])
        writer.add_head_count_kv([kv_heads if k else 0 for k in kept["attn"]])
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(int(head_dim))
    if arch == "gemma3":
        writer.add_sliding_window(int(config.sliding_window))
    if head_dim != config.hidden_size // config.num_attention_heads or arch in ("qwen3", "gemma3"):
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_vocab_size(int(config.vocab_size))


def _partial_drop_stand_ins(writer, kept: dict, hidden: int) -> int:
    """The tensors that stand for dropped halves of blocks in llama.cpp's ``deci`` graph, which
    computes exactly the residual stream of the dropped half from them; returns how many were written.

    * A dropped MLP is an FFN of width 1 with zero weights (its norm as ones): the graph has an
      "FFN-free" branch for width 0, but it also discards that layer's attention output.
    * A dropped attention has 0 heads (the graph passes the stream through), except in block 0,
      where llama.cpp reads the head size from the heads of block 0: there it is a "linear attention"
      (heads but no key-value heads) whose output projection is zero.
    """
    written = 0
    ones = np.ones(hidden, dtype=np.float32)
    for i, has_ffn in enumerate(kept["ffn"]):
        if not has_ffn:
            writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", np.zeros((1, hidden), dtype=np.float32))
            writer.add_tensor(f"blk.{i}.ffn_up.weight", np.zeros((1, hidden), dtype=np.float32))
            writer.add_tensor(f"blk.{i}.ffn_down.weight", np.zeros((hidden, 1), dtype=np.float32))
            written += 4
    if kept["attn"] and not kept["attn"][0]:
        writer.add_tensor("blk.0.attn_norm.weight", ones)
        writer.add_tensor("blk.0.attn_output.weight", np.zeros((hidden, hidden), dtype=np.float16))
        written += 2
    return written


def _tokenizer(writer, tokenizer, vocab_size: int) -> bool:
    """The tokenizer in llama.cpp's terms: a byte-level BPE (vocabulary, merges and special tokens:
    the ``gpt2`` tokenizer model) or a SentencePiece BPE (`_sentencepiece_tokenizer`). Returns
    whether a tokenizer was written."""
    from ..loading import load_tokenizer

    tok = load_tokenizer(tokenizer)
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback") and "\u2581" in json.dumps(
            [spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False):
        _sentencepiece_tokenizer(writer, tok, model, vocab_size, _adds_space_prefix(spec))
        return True
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        logger.warning("The tokenizer is neither a byte-level BPE nor a SentencePiece BPE tokenizer: the GGUF holds "
                       "no tokenizer (llama.cpp needs one; transformers can load the tokenizer from the original "
                       "folder).")
        return False
    tokens, types = _token_types(tok, vocab_size, byte_tokens=False)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = model.get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    _special_ids(writer, tok)
    return True


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) of a byte-level BPE ``pre_tokenizer`` of
    ``tokenizer.json`` whose splitting it runs exactly: GPT-2's regex (``gpt-2``), or single digits
    first and then GPT-2's regex (``smollm``: SmolLM, SmolLM2). Others get ``default`` (llama.cpp's
    generic rules, which split some punctuation differently).

    Examples:
        >>> pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True})
        'gpt-2'
    """
    def byte_level(node) -> bool:
        return isinstance(node, dict) and node.get("type") == "ByteLevel" and node.get("use_regex", True) \
            and not node.get("add_prefix_space", False)

    if byte_level(pre):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and byte_level(steps[1]):
        return "smollm"
    return "default"


def _token_types(tok, vocab_size: int, byte_tokens: bool) -> tuple:
    """Token strings and llama.cpp token types in id order (``<0xNN>`` byte tokens as ``BYTE`` when
    ``byte_tokens``; ids with no token as unused ``[PADi]``)."""
    import re

    import gguf

    vocab = tok.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    special = {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in special else gguf.TokenType.USER_DEFINED)
        elif byte_tokens and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            tokens.append(token)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _special_ids(writer, tok) -> None:
    vocab = tok.get_vocab()
    for role in ("bos", "eos", "unk", "pad"):
        token = getattr(tok, f"{role}_token", None)
        if token is not None and token in vocab:
            getattr(writer, f"add_{role}_token_id")(int(vocab[token]))
    writer.add_add_bos_token(tokenizer_adds_bos(tok))
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def _adds_space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece tokenizer puts ``▁`` before the text (Llama 2: a ``Prepend``
    normalizer or a ``Metaspace`` pre-tokenizer that prepends; Gemma: neither)."""
    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "Prepend" or (node.get("type") == "Metaspace"
                                                 and node.get("prepend_scheme", "always") != "never"):
                return True
            return any(walk(v) for v in node.values())
        return any(walk(v) for v in node) if isinstance(node, list) else False

    return walk(spec.get("normalizer")) or walk(spec.get("pre_tokenizer"))


def _sentencepiece_tokenizer(writer, tok, model: dict, vocab_size: int, space_prefix: bool = False) -> None:
    """A SentencePiece BPE tokenizer (``▁`` for spaces, byte fallback; Gemma, Llama 2) as llama.cpp's
    ``llama`` tokenizer model. llama.cpp merges the adjacent pair whose joined piece scores highest,
    so each piece scores minus the rank of the first merge that makes it: the merge order of
    ``tokenizer.json``."""
    import gguf

    tokens, types = _token_types(tok, vocab_size, byte_tokens=True)
    rank = {}
    for r, m in enumerate(model.get("merges", [])):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(left + right, r)
    unmade = -float(len(rank) + 1)  # single characters, bytes and added tokens: never a merge's result
    scores = [-float(rank[t]) if t in rank and ty == gguf.TokenType.NORMAL else unmade
              for t, ty in zip(tokens, types)]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(space_prefix)
    _special_ids(writer, tok)


# ============================================================================ export
@torch.no_grad()
def export_gguf(model, save_dir, tokenizer=None, dense_type: str = "F16", fallback: str = "F16",
                file_name: str = FILE_NAME) -> dict:
    """Write ``model`` (any EvoPress result: quantization, sparsity, whole-block depth) as one GGUF file.

    Args:
        model: an EvoPress model (packed linears keep their codes where a GGUF type holds them).
        save_dir: output folder; the file is ``save_dir / file_name``.
        tokenizer: tokenizer object or path (default: the model's own folder, if any).
        dense_type: type of the linears that are not packed and of the token embedding / untied head
            (``F16``, ``BF16``, ``F32`` or ``Q8_0``).
        fallback: type of packed linears no GGUF type holds exactly (see the module docstring).

    Returns:
        A summary dict (``format``, ``path``, ``file``, ``architecture``, ``types`` (count per GGUF
        type), ``exact`` / ``near_exact`` / ``fallback`` module lists, ``max_min_error`` (the largest
        weight change from storing ``Q4_1`` / ``Q5_1`` minimums in float16), ``bytes``).

    Raises:
        ExportError: an architecture llama.cpp's converters do not cover here, attention-/MLP-only
            drops, or a bad type name.
    """
    import gguf

    for name, value in (("dense_type", dense_type), ("fallback", fallback)):
        if value not in DENSE_TYPES:
            raise ValueError(f"{name} must be one of {DENSE_TYPES}, got {value!r}.")
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(f"GGUF export supports the model types {sorted(ARCHITECTURES)}; {model_type!r} has no "
                          "tensor mapping here. Export with 'dense' and convert with llama.cpp's convert_hf_to_gguf.py.")
    arch, permute = ARCHITECTURES[model_type]
    if arch == "gemma3":
        _check_gemma3(config)
    contents = model_contents(model)
    if contents.dropped:
        if arch not in PARTIAL_DROPS:
            raise ExportError(
                f"{len(contents.dropped)} attention-/MLP-only drops ({', '.join(sorted(contents.dropped)[:3])}) cannot "
                f"be written for llama.cpp's {arch!r} architecture (its graph runs both halves of every block; "
                f"only Llama-family models have one that skips half a block, {PARTIAL_DROPS['llama']!r}). Search "
                "with mode='block' (whole blocks only), or export with 'dense' (zeroed sub-blocks, exact outputs).")
        arch = PARTIAL_DROPS[arch]
    plain = build_plain_model(model, dtype=torch.float32, partial_drops="omit", contents=contents,
                              keep_quantized=True)
    layout = find_decoder_layout(plain)
    blocks = len(layout)
    # per kept block: which halves are written (llama.cpp's deci graph reads 0 heads / 0 FFN width as absent)
    kept = {part: [f"{layout.path}.{i}.{name}" not in contents.dropped for i in range(blocks)]
            for part, name in (("attn", layout.attn_name), ("ffn", layout.mlp_name))}
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_enum, blocks)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    path = save_dir / file_name
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(str(getattr(model, "name_or_path", "") or "model")).name)
    writer.add_quantized_by(f"optimum-evo {__version__}")
    _metadata(writer, config, arch, blocks, kept)
    tok = tokenizer if tokenizer is not None else source_tokenizer(model)
    has_tokenizer = bool(tok is not None and _tokenizer(writer, tok, int(config.vocab_size)))

    types, exact, near, fell, max_min_error = Counter(), [], [], [], 0.0
    tied = bool(getattr(config, "tie_word_embeddings", False))

    def rows_order(hf_name: str, rows: int):
        if not permute:
            return None
        if hf_name.endswith("q_proj"):
            return llama_permute(rows, heads)
        if hf_name.endswith("k_proj"):
            return llama_permute(rows, kv_heads)
        return None

    def target(hf_key: str) -> str:
        new = names.get_name(hf_key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"No GGUF name for {hf_key!r} in llama.cpp's {arch!r} tensor map.")
        return new

    def dropped(gguf_name: str) -> bool:
        """A tensor of a dropped half block (its norm included: ``blk.N.attn_*`` / ``blk.N.ffn_*``)."""
        parts = gguf_name.split(".")
        return parts[0] == "blk" and not kept.get(parts[2].split("_")[0], [True] * blocks)[int(parts[1])]

    state = plain.state_dict()
    for key, value in state.items():
        module = key.rsplit(".", 1)[0]
        if module in contents.quantized or module in contents.gguf or (tied and key == "lm_head.weight"):
            continue
        if dropped(target(key)):
            continue
        order = rows_order(module, value.shape[0]) if key.endswith((".weight", ".bias")) else None
        tensor = value[order] if order is not None else value
        if arch == "gemma3" and key.endswith("norm.weight"):
            tensor = tensor.float() + 1  # gemma's RMSNorm scales by 1 + weight; llama.cpp's by the weight
        array, raw, qtype = _torch_dtype_array(tensor, "F32" if tensor.dim() == 1 else dense_type)
        writer.add_tensor(target(key), array, raw_dtype=raw)
        types[qtype] += 1
    for module, layer in sorted(contents.quantized.items()):
        data = layer.quantized_data()
        order = rows_order(module, layer.out_features)
        held = _exact_type(data, layer.in_features)
        if held is None:
            weight = layer.dequantize_weight(torch.float32)
            array, raw, qtype = _torch_dtype_array(weight[order] if order is not None else weight, fallback)
            fell.append(module)
        else:
            qtype, codes, d, m = held
            if order is not None:
                codes, d = codes[order], d[order]
                m = m[order] if m is not None else None
            if m is not None:
                stored = m.to(torch.float16).float()
                max_min_error = max(max_min_error, float((stored - m).abs().max()))
                near.append(module)
            else:
                exact.append(module)
            array, raw = pack_blocks(codes, d, m, qtype), getattr(gguf.GGMLQuantizationType, qtype)
        writer.add_tensor(target(f"{module}.weight"), array, raw_dtype=raw)
        types[qtype] += 1
        if layer.bias is not None:
            bias = layer.bias.detach()
            writer.add_tensor(target(f"{module}.bias"), (bias[order] if order is not None else bias).float().cpu().numpy())
            types["F32"] += 1
    for module, layer in sorted(contents.gguf.items()):  # GGUF-type levels: their bytes, as the search scored them
        order = rows_order(module, layer.out_features)
        data = layer.qweight if order is None else layer.qweight[order]  # rows are independent blocks
        writer.add_tensor(target(f"{module}.weight"), data.cpu().numpy(),
                          raw_dtype=getattr(gguf.GGMLQuantizationType, layer.qtype))
        exact.append(module)
        types[layer.qtype] += 1
        if layer.bias is not None:
            bias = layer.bias.detach()
            writer.add_tensor(target(f"{module}.bias"), (bias[order] if order is not None else bias).float().cpu().numpy())
            types["F32"] += 1
    stand_ins = _partial_drop_stand_ins(writer, kept, int(config.hidden_size)) if contents.dropped else 0
    main = Counter({k: v for k, v in types.items() if k not in ("F32",)}).most_common(1)
    main_type = main[0][0] if main else "F16"
    file_type = next((getattr(gguf.LlamaFileType, f"MOSTLY_{main_type}{suffix}") for suffix in ("", "_M")
                      if hasattr(gguf.LlamaFileType, f"MOSTLY_{main_type}{suffix}")), gguf.LlamaFileType.GUESSED)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if fell:
        logger.warning("%d packed linears have no exact GGUF type (asymmetric 6-8 bits, act-order or groups not a "
                       "multiple of 32) and were written as %s.", len(fell), fallback)
    return {"format": "gguf", "path": str(save_dir), "file": file_name, "architecture": arch,
            "blocks": blocks, "types": dict(sorted(types.items())), "exact": exact, "near_exact": near,
            "fallback": fell, "max_min_error": max_min_error, "tokenizer": has_tokenizer,
            "dropped_halves": dict(Counter(contents.dropped.values())), "stand_ins": stand_ins,
            "bytes": path.stat().st_size}


class GGUFExporter(Exporter):
    name = "gguf"
    description = "GGUF for llama.cpp, one type per tensor (Q4_0/Q5_0/Q8_0 exact for symmetric group-32 grids)"
    loads_with = "llama.cpp, transformers (from_pretrained(dir, gguf_file='model.gguf'))"

    def usage(self, name: str) -> list:
        return ["```bash", f"llama-cli -m {FILE_NAME} -p \"The capital of France is\"   # after downloading {name}",
                "```", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{name}", gguf_file="{FILE_NAME}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{name}", gguf_file="{FILE_NAME}")', "```", ""]

    def export(self, model, save_dir, tokenizer=None, **kwargs) -> dict:
        return export_gguf(model, save_dir, tokenizer=tokenizer, **kwargs)


register_exporter(GGUFExporter)

"""Induction on three bundled 2-layer models: the offline task the demo, the tests and Binder use.

Induction (Olsson et al. 2022) completes ``... A B ... A`` with ``B``. It takes two heads in
two layers: a *previous-token head* in layer 0 writes, at every position ``j``, the token at
``j - 1``; an *induction head* in layer 1 reads that through its key, so that the query token
``A`` matches the position right after the earlier ``A``, and copies that position's token
(``B``) through its value into the output. ACDC's paper ran this task on redwood's
attn-only-2l; here the models are ours, trained by ``scripts/train_induction.py`` and
``scripts/train_induction_llama.py`` in a minute or two each on a 2-core CPU (see
``docs/induction.md``), so everything works offline:

- ``induction``: attention-only, 2 layers of 4 heads, no LayerNorm (81 edges);
- ``induction-gpt2``: GPT-2 architecture (LayerNorm and MLPs), 2 layers of 4 heads (110 edges);
- ``induction-llama``: a ``transformers`` Llama (rotary, grouped-query attention with 4 query
  heads sharing 2 key/value heads, SwiGLU, RMSNorm), 2 layers, shipped as a Hugging Face
  directory and loaded through ``TransformerBridge.boot_transformers``. Its key and value
  inputs belong to the KV groups, so its circuit names them ``A{l}.kv{g}.k|v``.

A prompt is ``BOS, A_0 .. A_{L-1}, A_0 .. A_{L-2}``: L distinct random tokens, then the same
segment again without its last token, so the last position must predict ``A_{L-1}`` and every
position of the repeated half (``L+1 .. 2L-1``) is predictable only by induction. The corrupt
prompt is ``BOS`` and ``2L - 1`` distinct random tokens with no repeat, so patching in any of
its activations takes away what induction needs, as the paper's resampled text did.

The heads are not assumed: ``head_scores`` measures them from attention patterns and the build
script records the scores and the heads picked by threshold in each model's bundled JSON.
``canonical_edges`` builds the circuit from those recorded heads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from acdc_viz.data import TokenPairs
from acdc_viz.graph import kv_node
from acdc_viz.metrics import Metric
from acdc_viz.tasks.base import Task, TaskError
from acdc_viz.tasks.bundled import bundled_meta, load_bundled

BOS = 0
D_VOCAB = 64
N_CTX = 24
SEGMENT_LEN = 8
"""Length L of the random segment in the task's prompts, which are ``2 * L`` tokens long."""
SEQ_LEN = 2 * SEGMENT_LEN
DEFAULT_PROMPTS = 20
PREV_THRESHOLD = 0.4
"""A layer-0 head whose previous-token score exceeds this is a previous-token head."""
INDUCTION_THRESHOLD = 0.4
"""A layer-1 head whose induction score exceeds this is an induction head."""

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "induction-attn-only-2l": {
        "d_model": 64, "d_head": 16, "n_heads": 4, "n_layers": 2, "n_ctx": N_CTX,
        "d_vocab": D_VOCAB, "attn_only": True, "normalization_type": None, "act_fn": "gelu",
        "seed": 0, "model_name": "induction-attn-only-2l",
    },
    "induction-gpt2-2l": {
        "d_model": 64, "d_head": 16, "n_heads": 4, "n_layers": 2, "n_ctx": N_CTX,
        "d_vocab": D_VOCAB, "d_mlp": 256, "attn_only": False, "normalization_type": "LN",
        "act_fn": "gelu", "seed": 0, "model_name": "induction-gpt2-2l",
    },
}
"""``TransformerBridgeConfig`` keyword arguments of the two bundled native bridges."""

LLAMA_MODEL = "induction-llama-2l"
HF_MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    LLAMA_MODEL: {
        "vocab_size": D_VOCAB, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": N_CTX, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": BOS, "eos_token_id": BOS, "initializer_range": 0.02,
    },
}
"""``transformers.LlamaConfig`` keyword arguments of the bundled Hugging Face model."""


# ----- prompts -------------------------------------------------------------------------------


def _distinct_tokens(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` rows of ``k`` distinct non-BOS tokens, uniformly at random."""
    keys = torch.rand(n, D_VOCAB - 1, generator=generator)
    return keys.argsort(dim=-1)[:, :k] + 1


def repeated_tokens(segments: torch.Tensor) -> torch.Tensor:
    """``BOS, A, A[:-1]`` for each row ``A`` of ``segments`` (n, L): prompts of 2L tokens."""
    bos = torch.full((segments.shape[0], 1), BOS, dtype=torch.int64)
    return torch.cat([bos, segments, segments[:, :-1]], dim=1)


def distinct_prompt_count(segment_len: int = SEGMENT_LEN) -> int:
    """How many distinct clean prompts exist: ordered choices of L distinct tokens."""
    return math.perm(D_VOCAB - 1, segment_len)


def make_pairs(n: int, seed: int = 0, segment_len: int = SEGMENT_LEN) -> TokenPairs:
    """``n`` distinct clean prompts ``BOS, A, A[:-1]`` and corrupt prompts without a repeat.

    Deterministic in ``seed`` (a private ``torch.Generator``; the global RNG is untouched).
    Raises ``TaskError`` when ``n`` exceeds the number of distinct prompts.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TaskError(f"the induction task needs a whole number of prompts >= 1, got {n!r}")
    if not 2 <= segment_len or 2 * segment_len > N_CTX:
        raise TaskError(f"segment_len must be in 2..{N_CTX // 2} (prompts of 2*L tokens fit the "
                        f"models' context of {N_CTX}), got {segment_len}")
    available = distinct_prompt_count(segment_len)
    if n > available:
        raise TaskError(
            f"asked for {n} induction prompts, but only {available} distinct ones exist with "
            f"segments of {segment_len} distinct tokens out of {D_VOCAB - 1}; ask for at most "
            f"{available}"
        )
    generator = torch.Generator().manual_seed(seed)
    rows: dict[tuple[int, ...], None] = {}
    while len(rows) < n:
        for row in _distinct_tokens(n - len(rows), segment_len, generator).tolist():
            rows.setdefault(tuple(row), None)
    segments = torch.tensor(list(rows), dtype=torch.int64)
    clean = repeated_tokens(segments)
    corrupt = torch.cat([clean[:, :1], _distinct_tokens(n, 2 * segment_len - 1, generator)], dim=1)
    return TokenPairs(clean, corrupt)


def repeated_positions(seq_len: int) -> range:
    """Positions whose next token induction predicts: the repeated half after its first token.

    In ``BOS, A_0..A_{L-1}, A_0..A_{L-2}`` (``seq_len = 2L``), position ``p`` in ``L+1 .. 2L-1``
    holds ``A_{p-L-1}`` and must predict ``A_{p-L}``, which sits at position ``p - L + 1``.
    """
    segment_len = _segment_len(seq_len)
    return range(segment_len + 1, 2 * segment_len)


def _segment_len(seq_len: int) -> int:
    if seq_len % 2 or seq_len < 4:
        raise TaskError(f"induction prompts have an even length 2*L >= 4 (BOS, A, A[:-1]), got "
                        f"{seq_len}")
    return seq_len // 2


def token_name(token: int) -> str:
    """``"BOS"`` or ``"t17"``: a token as the figure and the Llama model's tokenizer write it."""
    return "BOS" if token == BOS else f"t{token}"


def token_labels(pairs: TokenPairs) -> list[str]:
    """The first clean prompt as ``["BOS", "t17", ...]``."""
    return [token_name(t) for t in pairs.clean[0].tolist()]


# ----- metrics -------------------------------------------------------------------------------


def _targets(pairs: TokenPairs) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.tensor(list(repeated_positions(pairs.seq_len)))
    segment_len = pairs.seq_len // 2
    return positions, pairs.clean[:, positions - segment_len + 1]


def _nll_repeated(positions: torch.Tensor, targets: torch.Tensor,
                  circuit_logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(circuit_logits[:, positions.to(circuit_logits.device)], dim=-1)
    return -logp.gather(-1, targets.to(logp.device)[..., None]).mean()


def _kl_repeated(positions: torch.Tensor, circuit_logits: torch.Tensor,
                 full_logits: torch.Tensor) -> torch.Tensor:
    pos = positions.to(circuit_logits.device)
    kl = F.kl_div(F.log_softmax(circuit_logits[:, pos], dim=-1),
                  F.log_softmax(full_logits[:, pos], dim=-1), log_target=True, reduction="none")
    return kl.sum(-1).mean()


def nll_metric(pairs: TokenPairs) -> Metric:
    """Negative log-probability of the correct next token, averaged over the repeated half."""
    positions, targets = _targets(pairs)
    return Metric("nll_repeated", partial(_nll_repeated, positions, targets),
                  last_position_only=False)


def kl_metric(pairs: TokenPairs) -> Metric:
    """KL(full model ‖ circuit), summed over the vocabulary, averaged over the repeated half.

    The paper's induction metric: KL over the positions where induction applies.
    """
    positions, _ = _targets(pairs)
    return Metric("kl_repeated", partial(_kl_repeated, positions), last_position_only=False)


# ----- heads and the canonical circuit --------------------------------------------------------


def head_scores(model: Any, tokens: torch.Tensor) -> dict[str, list[list[float]]]:
    """Previous-token, induction and current-token scores of every head, from ``hook_pattern``.

    ``tokens`` are repeated prompts ``BOS, A, A[:-1]`` (``repeated_tokens``). The previous-token
    score is the mean attention from position ``p`` to ``p - 1`` over ``p >= 1``; the induction
    score is the mean attention from ``p`` in the repeated half (``repeated_positions``) to
    ``p - L + 1``, the token after the earlier occurrence of the current one; the current-token
    score (recorded, not used for the circuit) is the mean attention from ``p >= 1`` to itself.
    Each is a ``[layer][head]`` list.
    """
    seq_len = tokens.shape[1]
    segment_len = _segment_len(seq_len)
    device = next(model.parameters()).device
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(device),
                                        names_filter=lambda n: n.endswith("hook_pattern"))
    prev_rows = torch.arange(1, seq_len)
    ind_rows = torch.tensor(list(repeated_positions(seq_len)))
    prev, ind, cur = [], [], []
    for layer in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].float().cpu()  # (batch, head, q, k)
        prev.append(pattern[:, :, prev_rows, prev_rows - 1].mean((0, 2)).tolist())
        ind.append(pattern[:, :, ind_rows, ind_rows - segment_len + 1].mean((0, 2)).tolist())
        cur.append(pattern[:, :, prev_rows, prev_rows].mean((0, 2)).tolist())
    return {"previous_token": prev, "induction": ind, "current_token": cur}


def identify_heads(scores: dict[str, list[list[float]]]) -> dict[str, list[str]]:
    """Previous-token heads in layer 0 and induction heads in layer 1, by threshold.

    Only layer 0 can feed layer 1's keys, and only layer 1 can compose, so a head counts only
    in the layer where it can play its part.
    """
    prev = [f"A0.{h}" for h, s in enumerate(scores["previous_token"][0]) if s > PREV_THRESHOLD]
    ind = [f"A1.{h}" for h, s in enumerate(scores["induction"][1]) if s > INDUCTION_THRESHOLD]
    return {"previous_token": prev, "induction": ind}


def kv_inputs(head: str, group_size: int = 1) -> str:
    """The node whose key and value inputs head ``A{l}.{h}`` reads: the head itself, or under
    grouped-query attention (``group_size`` query heads per key/value head) its KV group
    ``A{l}.kv{g}``, g = h // group_size."""
    if group_size == 1:
        return head
    layer, index = head[1:].split(".")
    return kv_node(int(layer), int(index) // group_size)


def circuit_edges(heads: dict[str, list[str]], positions: bool, seq_len: int,
                  group_size: int = 1) -> set[str]:
    """The induction circuit of ``heads`` (``identify_heads``), as edge names.

    Without positions: for each previous-token head P and induction head I,
    ``Embed->P.v`` (the token it moves forward), ``P->I.k``, ``Embed->I.q``, ``Embed->I.v`` and
    ``I->Out``. P's query and key are left out: a previous-token head finds ``p - 1`` from the
    positional embedding (or, with rotary embeddings, from the rotation), which the clean and the
    corrupt prompt share, so under resample ablation those edges carry nothing that differs (see
    ``docs/induction.md``). With grouped-query attention (``group_size`` > 1) the k and v edges
    go to the head's KV group (``kv_inputs``): ``P->A1.kv0.k``, ``Embed->A0.kv0.v``.

    With positions, each edge at the positions where the repeated half uses it: ``I->Out`` and
    ``Embed->I.q`` at ``p`` in ``repeated_positions``; ``P->I.k`` and ``Embed->I.v`` at
    ``j = p - L + 1`` (2..L), where I attends; ``Embed->P.v`` at ``j - 1`` (1..L-1).
    """
    segment_len = _segment_len(seq_len)
    query_pos = list(repeated_positions(seq_len))
    key_pos = [p - segment_len + 1 for p in query_pos]
    prev_pos = [j - 1 for j in key_pos]

    def at(name: str, where: Iterable[int]) -> set[str]:
        return {f"{name}@{p}" for p in where} if positions else {name}

    edges: set[str] = set()
    for prev in heads["previous_token"]:
        edges |= at(f"Embed->{kv_inputs(prev, group_size)}.v", prev_pos)
    for ind in heads["induction"]:
        kv = kv_inputs(ind, group_size)
        edges |= at(f"{ind}->Out", query_pos) | at(f"Embed->{ind}.q", query_pos)
        edges |= at(f"Embed->{kv}.v", key_pos)
        for prev in heads["previous_token"]:
            edges |= at(f"{prev}->{kv}.k", key_pos)
    return edges


def recorded_heads(model_name: str) -> dict[str, list[str]]:
    """The heads the build script identified, from the bundled model's JSON."""
    return bundled_meta(model_name)["build"]["heads"]


def kv_group_size(model_name: str) -> int:
    """Query heads per key/value head of a bundled induction model (1 without grouping)."""
    config = HF_MODEL_CONFIGS.get(model_name)
    if config is None:
        return 1
    return config["num_attention_heads"] // config["num_key_value_heads"]


def canonical_edges(model_name: str, positions: bool, seq_len: int) -> set[str]:
    """The canonical circuit of a bundled induction model (heads read from its JSON)."""
    return circuit_edges(recorded_heads(model_name), positions, seq_len,
                         kv_group_size(model_name))


def circuit_metric(weights: Any, pairs: TokenPairs, kept: set[str] | None, metric: Metric,
                   ablation: str = "resample") -> float:
    """The metric of the circuit that keeps only ``kept`` (every edge when None).

    ``weights`` is the engine's ``TransformerWeights`` (``acdc_viz.models.adapter.from_model``).
    Used to verify that a canonical circuit does the task on its own.
    """
    from acdc_viz.graph import CircuitGraph
    from acdc_viz.patching import CircuitRunner

    positions = kept is not None and any("@" in e for e in kept)
    graph = CircuitGraph(weights.n_layers, weights.n_heads, attn_only=weights.attn_only,
                         n_positions=pairs.seq_len if positions else None,
                         n_kv_heads=weights.n_kv_heads)
    runner = CircuitRunner(weights, graph, pairs.clean.to(weights.device),
                           pairs.corrupt.to(weights.device), ablation,
                           last_position_only=metric.last_position_only)
    if kept is not None:
        unknown = sorted(set(kept) - set(graph.edge_index))
        if unknown:
            raise TaskError(f"edges not in the model's graph: {unknown[:5]}")
        for edge in graph.edges:
            if edge.name not in kept:
                runner.set_removed(edge, True)
    return metric(runner.logits_from(0, "attn"), runner.full_logits)


# ----- the tasks -----------------------------------------------------------------------------


def _expected_shape(model_name: str) -> dict[str, Any]:
    """The TransformerLens config values a model must share with a bundled induction model."""
    if model_name in MODEL_CONFIGS:
        config = MODEL_CONFIGS[model_name]
        return {key: config[key] for key in ("d_vocab", "n_layers", "n_heads", "attn_only")}
    config = HF_MODEL_CONFIGS[model_name]
    return {"d_vocab": config["vocab_size"], "n_layers": config["num_hidden_layers"],
            "n_heads": config["num_attention_heads"], "attn_only": False,
            "n_key_value_heads": config["num_key_value_heads"]}


def _check_model(model_name: str, model: Any) -> None:
    """Raise ``TaskError`` unless ``model`` has the shape of the bundled model the task uses."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise TaskError(f"the induction task needs a TransformerLens model, got "
                        f"{type(model).__name__}")
    wrong = [f"{key}={getattr(cfg, key, None)!r} (expected {value!r})"
             for key, value in _expected_shape(model_name).items()
             if getattr(cfg, key, None) != value]
    if getattr(cfg, "n_ctx", 0) < SEQ_LEN:
        wrong.append(f"n_ctx={getattr(cfg, 'n_ctx', None)!r} (expected >= {SEQ_LEN})")
    if wrong:
        raise TaskError(
            f"this model does not fit the task built on {model_name!r}: " + ", ".join(wrong) +
            f". Load the bundled model (acdc_viz.tasks.bundled.load_bundled({model_name!r})) or "
            "use a model of the same shape."
        )


def _load(model_name: str, device: str = "cpu") -> Any:
    return load_bundled(model_name, device=device)


def _task(name: str, model_name: str, description: str, default_tau: float,
          graph_shape: tuple[int, int, bool, int] | None = None) -> Task:
    """An induction task on one bundled model: the same prompts, metrics and circuit."""
    return Task(
        name=name,
        description=description,
        bundled=True,
        model_name=model_name,
        load_model=partial(_load, model_name),
        make_pairs=make_pairs,
        default_prompts=DEFAULT_PROMPTS,
        metrics={"kl_repeated": kl_metric, "nll_repeated": nll_metric},
        canonical_edges=partial(canonical_edges, model_name),
        default_tau=default_tau,
        default_ablation="resample",
        default_metric="kl_repeated",
        token_labels=token_labels,
        check_model=partial(_check_model, model_name),
        graph_shape=graph_shape,
    )


TASKS: list[Task] = [
    _task("induction", "induction-attn-only-2l",
          "induction on a bundled 2-layer attention-only model (4 heads), offline", 0.1),
    _task("induction-gpt2", "induction-gpt2-2l",
          "induction on a bundled 2-layer GPT-2-architecture model (LayerNorm, MLPs, 4 heads), "
          "offline",
          0.1),
    # graph_shape: the JSON of a Hugging Face directory holds no TransformerLens config
    _task("induction-llama", LLAMA_MODEL,
          "induction on a bundled 2-layer Llama-architecture model (rotary, grouped-query "
          "attention 4/2, SwiGLU, RMSNorm), offline",
          0.1, graph_shape=(2, 4, False, 2)),
]

__all__: list[str] = [
    "HF_MODEL_CONFIGS", "LLAMA_MODEL", "MODEL_CONFIGS", "TASKS", "canonical_edges",
    "circuit_edges", "circuit_metric", "distinct_prompt_count", "head_scores", "identify_heads",
    "kl_metric", "kv_group_size", "kv_inputs", "make_pairs", "nll_metric", "recorded_heads",
    "repeated_positions", "repeated_tokens", "token_labels", "token_name",
]

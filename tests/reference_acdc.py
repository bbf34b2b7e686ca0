"""Brute-force reference implementation of ACDC (Conmy et al. 2023), for tests only.

WHY THIS FILE EXISTS
--------------------
The fast engine in ``acdc_viz`` reuses caches, batches candidate edges, and
patches cleverly.  This module is its *independent* oracle: it deliberately
imports nothing from ``acdc_viz`` and does the dumbest correct thing:

* every metric evaluation is ONE FULL forward pass of the model on the clean
  prompts, with hooks that implement *every* removed edge from scratch;
* the only thing reused across passes is the corrupt-run cache (the ablated
  source outputs) and the full model's clean logits (the metric's target);
* each removed edge is applied separately, in a plain Python loop, so the code
  reads like the definition.

SEMANTICS (identical to the brief the engine follows)
----------------------------------------------------
Sources: ``Embed`` (embedding + positional embedding, i.e. ``blocks.0`` residual
input), ``A{l}.{h}`` (output of head h of layer l *without* b_O; b_O always
stays), ``MLP{l}`` (MLP output).
Destinations: ``A{l}.{h}.q|k|v`` (each head's private copy of the residual stream
*before* its LayerNorm), ``MLP{l}`` (MLP input before its LayerNorm), ``Out``
(final residual stream before ln_final).  With grouped-/multi-query attention
(``n_key_value_heads`` < ``n_heads``) keys and values are computed once per KV
group, so their inputs are per group: ``A{l}.kv{g}.k|v`` (group g is read by
query heads g*r .. g*r+r-1); queries stay ``A{l}.{h}.q``.  The bridge's
``hook_k_input`` / ``hook_v_input`` then have one copy per KV group
(batch, pos, n_kv_heads, d_model), and group g's copy is patched.  With sandwich
norms (Gemma 2: the summed attention output is normed before the residual add)
the attention source of a layer is its normed output ``A{l}``, recorded at
``blocks.{l}.ln1_post.hook_out``, and the MLP source the normed MLP output at
``blocks.{l}.ln2_post.hook_out`` (TL 3: ``hook_attn_out`` and ``hook_mlp_out``, which follow its
post-norms); heads remain destinations.
Removing src->dest: dest_input <- dest_input - current(src) + ablated(src), where
current(src) is src's output *in this very forward pass* (so it already reflects
any patching of src's own inputs).  With positions, ``src->dest@p`` only changes
position p of the destination's input.

HOW THE HOOKS MAP ONTO TransformerLens 4 ``TransformerBridge``
--------------------------------------------------------------
Two modes, detected by trying ``set_use_split_qkv_input(True)``:

"split" (e.g. GPT-2 via ``boot_transformers``): with ``use_split_qkv_input``,
``use_attn_result`` and ``use_hook_mlp_in`` enabled,
  * ``blocks.{l}.attn.hook_{q,k,v}_input``  (batch, pos, head, d_model): per-head
    copy of the residual stream, forked *before* ln1 (ln1 is re-applied per
    head afterwards) -> destination hooks for A{l}.{h}.{q,k,v};
  * ``blocks.{l}.attn.hook_result`` (batch, pos, head, d_model): per-head output
    without b_O (the bridge sums over heads and adds b_O afterwards) -> source;
  * ``blocks.{l}.hook_mlp_in`` (batch, pos, d_model): a forward-pre-hook on ln2, so
    editing it changes only the MLP's input, not the residual stream -> MLP dest;
  * ``blocks.{l}.hook_mlp_out`` -> MLP source.
"native" (``boot_native``, no normalization): no per-head input hooks exist, so
a correction c (batch, pos, d_model) to head h's query input is pushed through
the (linear, LayerNorm-free) projection: ``hook_q[..., h, :] += c @ W_Q[l, h]``
(the bias b_Q is unaffected because it is added once regardless of the input).
Same for k/v.  Head outputs are ``hook_z[..., h, :] @ W_O[l, h]``.
Both modes: ``blocks.0.hook_resid_pre`` is the Embed source and
``ln_final.hook_in`` is the Out destination.

PARALLEL BLOCKS (``cfg.parallel_attn_mlp``, or a ``ParallelBlockBridge``: GPT-NeoX, Phi): the MLP
reads the block's input, so ``MLP{l}`` has no edges from ``A{l}.*``.  GPT-NeoX's MLP has its own
norm and ``hook_mlp_in`` (its ln2's input) fires.  Phi's MLP reads the attention's ln1 output and
``hook_mlp_in`` never fires; with the split inputs on, the heads read their own copies, so
``blocks.{l}.ln1.hook_in`` feeds only the MLP (measured: editing it changes ``mlp.hook_out`` and
leaves ``attn.hook_result`` and the residual unchanged) and is the MLP destination there.

NOTE: a freshly built HF model is in train mode (dropout 0.1!).  The reference
temporarily switches the bridge to eval mode (and restores the per-module
training flags and the hook flags afterwards) so results are deterministic.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from functools import partial
from typing import NamedTuple

import torch

__all__ = [
    "RefStep",
    "parse_edge",
    "reference_acdc",
    "reference_edge_names",
    "reference_logits",
    "reference_metric",
]


class RefStep(NamedTuple):
    edge: str
    metric_before: float  # metric of the current circuit before testing this edge
    metric_after: float  # metric of the circuit with this edge (and all earlier removals) removed
    removed: bool


# --------------------------------------------------------------------------------------
# Graph: names and visit order
# --------------------------------------------------------------------------------------


def _sources_before(
    layer: int, n_heads: int, attn_only: bool, *, include_heads_of: int | None = None,
    sandwich: bool = False,
):
    """Sources, latest first, that are computed before a reader in layer ``layer``.

    ``include_heads_of`` = l adds the heads of layer l (used for MLP{l}, which
    reads after its own layer's attention).  Within a layer, the MLP is later
    than the heads, so it comes first; heads go from high to low; Embed is last.
    """
    def attention(s: int) -> list[str]:
        return [f"A{s}"] if sandwich else [f"A{s}.{h}" for h in reversed(range(n_heads))]

    out: list[str] = []
    if include_heads_of is not None:
        out += attention(include_heads_of)
    for s in reversed(range(layer)):
        if not attn_only:
            out.append(f"MLP{s}")
        out += attention(s)
    out.append("Embed")
    return out


def _attention_inputs(layer: int, n_heads: int, n_kv: int) -> list[str]:
    """A layer's q/k/v destinations in visit order: heads from high to low, each q, k, v; with
    KV groups, the groups from high to low, each its heads' q (high to low) then its k and v."""
    if n_kv == n_heads:
        return [f"A{layer}.{h}.{x}" for h in reversed(range(n_heads)) for x in "qkv"]
    size = n_heads // n_kv
    out: list[str] = []
    for g in reversed(range(n_kv)):
        out += [f"A{layer}.{h}.q" for h in reversed(range(g * size, (g + 1) * size))]
        out += [f"A{layer}.kv{g}.k", f"A{layer}.kv{g}.v"]
    return out


def _destinations(
    n_layers: int, n_heads: int, attn_only: bool, parallel: bool = False,
    n_kv: int | None = None, sandwich: bool = False,
) -> list[tuple[str, list[str]]]:
    """(destination, its sources in visit order), destinations in visit order.

    With ``parallel`` blocks, MLP{l} reads the block's input: no edge from its layer's heads.
    ``n_kv``: key/value heads per layer (None: as many as query heads).
    """
    dests: list[tuple[str, list[str]]] = [
        ("Out", _sources_before(n_layers, n_heads, attn_only, sandwich=sandwich))]
    for layer in reversed(range(n_layers)):
        if not attn_only:
            own_heads = None if parallel else layer
            dests.append(
                (f"MLP{layer}",
                 _sources_before(layer, n_heads, attn_only, include_heads_of=own_heads,
                                 sandwich=sandwich))
            )
        for dest in _attention_inputs(layer, n_heads, n_kv or n_heads):
            dests.append((dest, _sources_before(layer, n_heads, attn_only, sandwich=sandwich)))
    return dests


def reference_edge_names(
    n_layers: int, n_heads: int, attn_only: bool, n_positions: int | None = None,
    parallel: bool = False, n_kv: int | None = None, sandwich: bool = False,
) -> list[str]:
    """All edges in ACDC visit order.

    Without positions: ``src->dest``.  With ``n_positions``: each (src, dest) pair
    expands to ``src->dest@p`` for p = n_positions-1 .. 0, consecutively.
    """
    names: list[str] = []
    for dest, srcs in _destinations(n_layers, n_heads, attn_only, parallel, n_kv, sandwich):
        for src in srcs:
            if n_positions is None:
                names.append(f"{src}->{dest}")
            else:
                names += [f"{src}->{dest}@{p}" for p in reversed(range(n_positions))]
    return names


_SRC_RE = re.compile(r"^(Embed|A(\d+)\.(\d+)|A(\d+)|MLP(\d+))$")
_DEST_RE = re.compile(r"^(Out|MLP(\d+)|A(\d+)\.(\d+)\.([qkv])|A(\d+)\.kv(\d+)\.([kv]))$")


class _Edge(NamedTuple):
    src: str
    dest: str
    pos: int | None


def parse_edge(name: str) -> _Edge:
    """``'A0.3->A1.2.k@5'`` -> _Edge('A0.3', 'A1.2.k', 5)."""
    pair, _, pos = name.partition("@")
    src, arrow, dest = pair.partition("->")
    if not arrow or not _SRC_RE.match(src) or not _DEST_RE.match(dest):
        raise ValueError(f"bad edge name {name!r}")
    return _Edge(src, dest, int(pos) if pos else None)


# --------------------------------------------------------------------------------------
# Bridge preparation (mode detection, eval mode, flag restore)
# --------------------------------------------------------------------------------------


class _Info(NamedTuple):
    mode: str  # "split" or "native"
    n_layers: int
    n_heads: int
    attn_only: bool
    W_Q: torch.Tensor | None  # native mode only: (layers, heads, d_model, d_head)
    W_K: torch.Tensor | None
    W_V: torch.Tensor | None
    W_O: torch.Tensor | None  # native mode only: (layers, heads, d_head, d_model)
    out_hook: str  # where the Out destination's input is patched
    parallel: bool = False  # parallel attention + MLP blocks
    mlp_hook: str = "hook_mlp_in"  # blocks.{l}.<this>: where the MLP destination is patched
    n_kv: int | None = None  # key/value heads per layer when fewer than n_heads (KV groups)
    sandwich: bool = False  # normed attention/MLP outputs: one attention source per layer
    normed_hooks: tuple[str, str] = ("", "")  # blocks.{l}.<these>: the normed outputs


_FLAGS = ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in")


@contextlib.contextmanager
def _prepared(bridge) -> Iterator[_Info]:
    cfg = bridge.cfg
    old_flags = {f: bool(getattr(cfg, f, False)) for f in _FLAGS}
    old_training = {m: m.training for m in bridge.modules()}
    try:
        bridge.eval()
        attn_only = bool(cfg.attn_only)
        n_kv = getattr(cfg, "n_key_value_heads", None)
        n_kv = None if n_kv in (None, cfg.n_heads) else int(n_kv)
        try:
            bridge.set_use_split_qkv_input(True)
            bridge.set_use_attn_result(True)
            mode = "split"
        except NotImplementedError:
            mode = "native"
        if not attn_only:
            bridge.set_use_hook_mlp_in(True)
        if mode == "native":
            # The linear trick (correct the projection output instead of the
            # input) is only exact when nothing nonlinear (LayerNorm) sits
            # between the residual copy and the projection.
            if cfg.normalization_type is not None:
                raise NotImplementedError(
                    "reference_acdc: bridge has no per-head input hooks and uses "
                    f"normalization {cfg.normalization_type!r}; cannot patch exactly"
                )
            if n_kv is not None:
                raise NotImplementedError("reference_acdc: GQA not supported in native mode")
            with torch.no_grad():
                ws = [getattr(bridge, n).detach().clone() for n in ("W_Q", "W_K", "W_V", "W_O")]
        else:
            ws = [None] * 4
        # TL 4 bridges have ln_final.hook_in; TL 3's HookedTransformer does not, and there the
        # last block's hook_resid_post feeds only ln_final.
        out_hook = ("ln_final.hook_in" if "ln_final.hook_in" in bridge.hook_dict
                    else f"blocks.{int(cfg.n_layers) - 1}.hook_resid_post")
        block = type(getattr(bridge, "blocks", [None])[0]).__name__
        parallel = not attn_only and (bool(getattr(cfg, "parallel_attn_mlp", False))
                                      or block == "ParallelBlockBridge")
        # A parallel block whose MLP shares ln1 (Phi) has no ln2: hook_mlp_in never fires there.
        # (TL 3's norms have no hook_in; its parallel blocks fire hook_mlp_in.)
        mlp_hook = ("ln1.hook_in" if parallel and "blocks.0.ln1.hook_in" in bridge.hook_dict
                    and "blocks.0.ln2.hook_in" not in bridge.hook_dict else "hook_mlp_in")
        if block == "BloomBlockBridge":
            raise NotImplementedError("reference_acdc: Bloom's bridge hands the heads their "
                                      "input after ln1 (hook_q_input is ln1's output), so the "
                                      "stream before ln1 cannot be patched per head; use TL 3")
        if parallel and mode != "split":
            raise NotImplementedError("reference_acdc: parallel blocks need the split inputs")
        # TL 4 bridges hook the post-norms' outputs; TL 3 hooks hook_attn_out/hook_mlp_out after
        # them (its cfg says use_normalization_before_and_after)
        tl4_norms = "blocks.0.ln1_post.hook_out" in bridge.hook_dict
        sandwich = tl4_norms or bool(getattr(cfg, "use_normalization_before_and_after", False))
        normed_hooks = (("ln1_post.hook_out", "ln2_post.hook_out") if tl4_norms
                        else ("hook_attn_out", "hook_mlp_out"))
        if sandwich and mode != "split":
            raise NotImplementedError("reference_acdc: sandwich norms need the split inputs")
        yield _Info(mode, int(cfg.n_layers), int(cfg.n_heads), attn_only, *ws, out_hook,
                    parallel, mlp_hook, n_kv, sandwich, normed_hooks)
    finally:
        for f, v in old_flags.items():
            cur = bool(getattr(cfg, f, False))
            if cur != v:
                getattr(bridge, "set_" + f)(v)
        for m, t in old_training.items():
            m.training = t


# --------------------------------------------------------------------------------------
# Recording source outputs and patching destination inputs
# --------------------------------------------------------------------------------------


def _source_hooks(info: _Info, store: dict[str, torch.Tensor]) -> list:
    """Hooks that record every source's output (batch, pos, d_model) into ``store``.

    They never modify anything; they are registered on every forward pass so the
    'current' output of any source is available when a later destination reads.
    """
    hooks = []

    def rec_embed(x, hook):
        store["Embed"] = x.detach()
        return x

    hooks.append(("blocks.0.hook_resid_pre", rec_embed))
    for layer in range(info.n_layers):
        if info.sandwich:

            def rec_normed(x, hook, name=f"A{layer}"):
                store[name] = x.detach()
                return x

            attn_hook, mlp_hook = info.normed_hooks
            hooks.append((f"blocks.{layer}.{attn_hook}", rec_normed))
            if not info.attn_only:
                hooks.append((f"blocks.{layer}.{mlp_hook}",
                              partial(rec_normed, name=f"MLP{layer}")))
            continue
        if info.mode == "split":

            def rec_result(x, hook, layer=layer):
                for h in range(info.n_heads):
                    store[f"A{layer}.{h}"] = x[:, :, h, :].detach()
                return x

            hooks.append((f"blocks.{layer}.attn.hook_result", rec_result))
        else:

            def rec_z(x, hook, layer=layer):
                for h in range(info.n_heads):
                    store[f"A{layer}.{h}"] = (x[:, :, h, :] @ info.W_O[layer, h]).detach()
                return x

            hooks.append((f"blocks.{layer}.attn.hook_z", rec_z))
        if not info.attn_only:

            def rec_mlp(x, hook, layer=layer):
                store[f"MLP{layer}"] = x.detach()
                return x

            hooks.append((f"blocks.{layer}.hook_mlp_out", rec_mlp))
    return hooks


def _correction(
    edges: list[_Edge], current: dict, ablated: dict, like: torch.Tensor
) -> torch.Tensor:
    """Sum over removed edges into one destination of (ablated - current), (batch, pos, d_model).

    ``like`` is a (batch, pos, d_model) tensor giving shape/dtype.  Position-split
    edges contribute only at their own position.  ``current[src]`` must already be
    recorded in this pass -- a KeyError here would mean a hook-ordering bug.
    """
    corr = torch.zeros_like(like)
    for e in edges:
        diff = ablated[e.src] - current[e.src]  # mean ablation (pos, d) broadcasts over batch
        if e.pos is None:
            corr = corr + diff
        else:
            corr[:, e.pos, :] = corr[:, e.pos, :] + diff[:, e.pos, :]
    return corr


def _dest_hooks(info: _Info, removed: list[_Edge], current: dict, ablated: dict) -> list:
    by_dest: dict[str, list[_Edge]] = {}
    for e in removed:
        by_dest.setdefault(e.dest, []).append(e)
    hooks = []

    if "Out" in by_dest:

        def patch_out(x, hook, es=by_dest["Out"]):
            return x + _correction(es, current, ablated, x)

        # TL 4 bridges name the final stream's input ln_final.hook_in; TL 3's HookedTransformer
        # has no such hook, and its last block's hook_resid_post feeds only ln_final.
        hooks.append((info.out_hook, patch_out))

    for layer in range(info.n_layers):
        if f"MLP{layer}" in by_dest:

            def patch_mlp(x, hook, es=by_dest[f"MLP{layer}"]):
                return x + _correction(es, current, ablated, x)

            hooks.append((f"blocks.{layer}.{info.mlp_hook}", patch_mlp))
        for x_kind in "qkv":
            # index along the hook's head axis -> its destination's name: the query heads, or
            # for k and v with KV groups, the groups
            if info.n_kv is None or x_kind == "q":
                names = {h: f"A{layer}.{h}.{x_kind}" for h in range(info.n_heads)}
            else:
                names = {g: f"A{layer}.kv{g}.{x_kind}" for g in range(info.n_kv)}
            per_head = {h: by_dest[name] for h, name in names.items() if name in by_dest}
            if not per_head:
                continue
            if info.mode == "split":
                # x: (batch, pos, head, d_model), the pre-ln1 per-head copy.
                def patch_in(x, hook, per_head=per_head):
                    out = x.clone()
                    for h, es in per_head.items():
                        out[:, :, h, :] = x[:, :, h, :] + _correction(
                            es, current, ablated, x[:, :, h, :]
                        )
                    return out

                # blocks.{layer}.hook_q_input: TL 3's name, which TL 4 bridges keep as an alias.
                hooks.append((f"blocks.{layer}.hook_{x_kind}_input", patch_in))
            else:
                W = {"q": info.W_Q, "k": info.W_K, "v": info.W_V}[x_kind][
                    layer
                ]  # (head, d_model, d_head)

                # x: (batch, pos, head, d_head), projection output incl. bias.
                def patch_proj(x, hook, per_head=per_head, W=W):
                    out = x.clone()
                    like = current["Embed"]  # any (batch, pos, d_model) tensor
                    for h, es in per_head.items():
                        c = _correction(es, current, ablated, like)
                        out[:, :, h, :] = x[:, :, h, :] + c @ W[h]
                    return out

                hooks.append((f"blocks.{layer}.attn.hook_{x_kind}", patch_proj))
    return hooks


def _validate(edges: list[_Edge], info: _Info, seq: int) -> None:
    valid = set(reference_edge_names(info.n_layers, info.n_heads, info.attn_only,
                                     parallel=info.parallel, n_kv=info.n_kv,
                                     sandwich=info.sandwich))
    for e in edges:
        if f"{e.src}->{e.dest}" not in valid:
            raise ValueError(f"edge {e.src}->{e.dest} is not in the graph")
        if e.pos is not None and not (0 <= e.pos < seq):
            raise ValueError(f"edge position {e.pos} out of range for {seq} positions")


def _forward(bridge, info: _Info, tokens: torch.Tensor, removed: list[_Edge], ablated: dict | None):
    """One full forward pass; returns (logits, recorded source outputs)."""
    current: dict[str, torch.Tensor] = {}
    hooks = _source_hooks(info, current)
    if removed:
        hooks += _dest_hooks(info, removed, current, ablated)
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=hooks)
    return logits, current


def _ablated_outputs(bridge, info: _Info, corrupt: torch.Tensor, ablation: str) -> dict:
    _, cache = _forward(bridge, info, corrupt, [], None)
    if ablation == "resample":
        return cache
    if ablation == "zero":
        return {k: torch.zeros_like(v) for k, v in cache.items()}
    if ablation == "mean":
        return {k: v.mean(dim=0) for k, v in cache.items()}  # (pos, d_model)
    raise ValueError(f"unknown ablation {ablation!r}")


def _metric_value(
    circ: torch.Tensor, full: torch.Tensor, metric: str, all_positions: bool
) -> float:
    if not all_positions:
        circ, full = circ[:, -1:, :], full[:, -1:, :]
    dtype = torch.promote_types(circ.dtype, torch.float32)
    circ, full = circ.to(dtype), full.to(dtype)
    if metric == "kl":
        lp_full = torch.log_softmax(full, dim=-1)
        lp_circ = torch.log_softmax(circ, dim=-1)
        kl = (lp_full.exp() * (lp_full - lp_circ)).sum(dim=-1)  # (batch, pos)
        return float(kl.mean())
    if metric == "mse":
        return float(((circ - full) ** 2).mean())
    raise ValueError(f"unknown metric {metric!r}")


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def reference_logits(
    bridge, clean, corrupt, removed_edges, ablation: str = "resample"
) -> torch.Tensor:
    """Logits (batch, pos, vocab) of the circuit with ``removed_edges`` removed (one full pass)."""
    with _prepared(bridge) as info:
        edges = sorted((parse_edge(n) for n in removed_edges), key=repr)
        _validate(edges, info, clean.shape[1])
        ablated = _ablated_outputs(bridge, info, corrupt, ablation)
        logits, _ = _forward(bridge, info, clean, edges, ablated)
        return logits


def reference_metric(
    bridge,
    clean,
    corrupt,
    removed_edges,
    ablation: str = "resample",
    metric: str = "kl",
    all_positions: bool = False,
) -> float:
    """Metric of the circuit with ``removed_edges`` removed, from scratch."""
    with _prepared(bridge) as info:
        edges = sorted((parse_edge(n) for n in removed_edges), key=repr)
        _validate(edges, info, clean.shape[1])
        ablated = _ablated_outputs(bridge, info, corrupt, ablation)
        full, _ = _forward(bridge, info, clean, [], None)
        circ, _ = _forward(bridge, info, clean, edges, ablated)
        return _metric_value(circ, full, metric, all_positions)


def reference_acdc(
    bridge,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    *,
    tau: float,
    ablation: str = "resample",
    positions: bool = False,
    metric: str = "kl",
    all_positions: bool = False,
    abs_delta: bool = False,
    max_steps: int | None = None,
) -> list[RefStep]:
    """Run ACDC by brute force; one RefStep per tested edge, in visit order."""
    if clean.shape != corrupt.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupt {tuple(corrupt.shape)} differ")
    if math.isnan(tau):
        raise ValueError("tau is NaN")
    with _prepared(bridge) as info:
        ablated = _ablated_outputs(bridge, info, corrupt, ablation)
        full, _ = _forward(bridge, info, clean, [], None)
        names = reference_edge_names(
            info.n_layers, info.n_heads, info.attn_only, clean.shape[1] if positions else None,
            parallel=info.parallel, n_kv=info.n_kv, sandwich=info.sandwich,
        )
        removed: list[_Edge] = []

        def circuit_metric(edges: list[_Edge]) -> float:
            circ, _ = _forward(bridge, info, clean, edges, ablated)
            return _metric_value(circ, full, metric, all_positions)

        cur = circuit_metric(removed)  # the full model: exactly 0 for kl and mse
        steps: list[RefStep] = []
        for i, name in enumerate(names):
            if max_steps is not None and i >= max_steps:
                break
            edge = parse_edge(name)
            after = circuit_metric(removed + [edge])
            delta = after - cur
            remove = abs(delta) < tau if abs_delta else delta < tau
            steps.append(RefStep(name, cur, after, bool(remove)))
            if remove:
                removed.append(edge)
                cur = after
        return steps

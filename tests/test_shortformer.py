"""Shortformer models (redwood_attn_2l's kind) against a reference written here in plain torch.

The reference follows TransformerLens' HookedTransformer with ``positional_embedding_type=
"shortformer"``: the stream starts as the token embedding; a head's query and key inputs are
``ln1(resid) + W_pos``, its value input ``ln1(resid)``. A removed edge changes the destination's
input before ``ln1`` (``hook_q_input`` in the ACDC code). It reads the checkpoint's raw state dict
and shares no code with the loader or the engine.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
import torch
from conftest import shortformer_checkpoint, token_pairs

from acdc_viz import Acdc
from acdc_viz.graph import CircuitGraph
from acdc_viz.models.loading import ModelLoadError
from acdc_viz.models.shortformer import load_redwood_weights, weights_from_state_dict
from acdc_viz.patching import CircuitRunner


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def reference_run(sd, cfg, tokens, removed=(), ablated=None):
    """Logits (batch, pos, vocab) of the model without ``removed`` edges, each source replaced by
    ``ablated[src]`` on those edges; and every source's output in this run."""
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    n_pos, eps = tokens.shape[1], cfg["eps"]
    pos = sd["pos_embed.W_pos"][:n_pos]
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    resid = sd["embed.W_E"][tokens]
    outs = {"Embed": resid}
    into = defaultdict(list)
    for e in removed:
        into[e.dest.name].append(e)

    def dest_input(dest, x):
        x = x.clone()
        for e in into[dest]:
            assert ablated is not None
            diff = ablated[e.src.name] - outs[e.src.name]
            if e.position is None:
                x += diff
            else:
                x[:, e.position] += diff[:, e.position]
        return x

    for layer in range(cfg["n_layers"]):
        a = f"blocks.{layer}"

        def ln1(x, a=a):
            return _layer_norm(x, sd[f"{a}.ln1.w"], sd[f"{a}.ln1.b"], eps)

        heads = []
        for h in range(cfg["n_heads"]):
            name = f"A{layer}.{h}"
            W_Q, W_K, W_V = (sd[f"{a}.attn.W_{x}"][h] for x in "QKV")
            b_Q, b_K, b_V = (sd[f"{a}.attn.b_{x}"][h] for x in "QKV")
            q = (ln1(dest_input(f"{name}.q", resid)) + pos) @ W_Q + b_Q
            k = (ln1(dest_input(f"{name}.k", resid)) + pos) @ W_K + b_K
            v = ln1(dest_input(f"{name}.v", resid)) @ W_V + b_V
            scores = (q @ k.transpose(-1, -2)) / cfg["d_head"] ** 0.5
            pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            heads.append((pattern @ v) @ sd[f"{a}.attn.W_O"][h])
        for h, out in enumerate(heads):
            outs[f"A{layer}.{h}"] = out
        resid = resid + sum(heads) + sd[f"{a}.attn.b_O"]
    final = _layer_norm(dest_input("Out", resid), sd["ln_final.w"], sd["ln_final.b"], eps)
    return final @ sd["unembed.W_U"] + sd["unembed.b_U"], outs


def reference_ablated(sd, cfg, corrupt, ablation):
    outs = reference_run(sd, cfg, corrupt)[1]
    if ablation == "zero":
        return {k: torch.zeros_like(v) for k, v in outs.items()}
    if ablation == "mean":
        return {k: v.mean(0, keepdim=True).expand_as(v) for k, v in outs.items()}
    return outs


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return shortformer_checkpoint(tmp_path_factory.mktemp("shortformer"))


def test_loaded_checkpoint_matches_the_reference_forward(checkpoint):
    directory, sd, cfg = checkpoint
    clean, _ = token_pairs(batch=4, pos=12)
    ref = reference_run(sd, cfg, clean)[0]
    w64 = load_redwood_weights(directory, dtype=torch.float64)
    assert w64.W_pos is None and w64.W_pos_qk is not None and w64.n_ctx == cfg["n_ctx"]
    torch.testing.assert_close(w64.forward(clean), ref, atol=1e-12, rtol=1e-12)
    w32 = load_redwood_weights(directory / "final.pth")       # the file alone, config beside it
    torch.testing.assert_close(w32.forward(clean).double(), ref, atol=1e-4, rtol=1e-4)
    # The positions matter, and only through q and k: without them the logits change.
    no_pos = {**sd, "pos_embed.W_pos": torch.zeros_like(sd["pos_embed.W_pos"])}
    plain = weights_from_state_dict(no_pos, cfg).to(dtype=torch.float64)
    assert (plain.forward(clean) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("ablation", ["resample", "zero", "mean"])
@pytest.mark.parametrize("positions", [False, True])
def test_runner_matches_the_patched_reference(checkpoint, ablation, positions):
    """The engine's logits with a random third of the edges removed equal the
    independent shortformer reference's."""
    directory, sd, cfg = checkpoint
    clean, corrupt = token_pairs(batch=4, pos=6)
    weights = load_redwood_weights(directory, dtype=torch.float64)
    graph = CircuitGraph(cfg["n_layers"], cfg["n_heads"], attn_only=True,
                         n_positions=clean.shape[1] if positions else None)
    runner = CircuitRunner(weights, graph, clean, corrupt, ablation, last_position_only=False)
    full = reference_run(sd, cfg, clean)[0]
    torch.testing.assert_close(runner.full_logits, full, atol=1e-10, rtol=1e-10)
    removed = random.Random(0).sample(list(graph.edges), len(graph.edges) // 3)
    for e in removed:
        runner.set_removed(e, True)
    ours = runner.logits_from(0, "attn")
    ablated = reference_ablated(sd, cfg, corrupt, ablation)
    theirs = reference_run(sd, cfg, clean, removed, ablated)[0]
    assert (theirs - full).abs().max() > 1e-3     # the removals change the output
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("last_only", [True, False])
def test_chains_with_the_causal_prefix_match_the_reference(checkpoint, last_only):
    """chain_logits in position mode (keys and values of earlier positions from the cache, so the
    positional part of q and k must line up with the recomputed positions) against the reference,
    walking the visit order as ACDC does and accepting a mixed circuit on the way."""
    directory, sd, cfg = checkpoint
    clean, corrupt = token_pairs(batch=3, pos=6, seed=2)
    weights = load_redwood_weights(directory, dtype=torch.float64)
    graph = CircuitGraph(cfg["n_layers"], cfg["n_heads"], attn_only=True, n_positions=6)
    runner = CircuitRunner(weights, graph, clean, corrupt, "resample", last_position_only=last_only)
    assert runner.reuse_prefix
    ablated = reference_ablated(sd, cfg, corrupt, "resample")
    rng, edges, removed, i, checked = random.Random(3), graph.edges, [], 0, 0
    while i < len(edges):
        chain = edges[i: i + rng.choice([1, 3, 6])]
        fast = runner.chain_logits(chain)
        if rng.random() < 0.15:
            for j in range(len(chain)):
                ref = reference_run(sd, cfg, clean, removed + list(chain[: j + 1]), ablated)[0]
                torch.testing.assert_close(fast[j], ref[:, -1] if last_only else ref,
                                           atol=1e-10, rtol=1e-10)
            checked += 1
        for e in chain:
            if rng.random() < 0.25:
                break
            runner.accept(e)
            removed.append(e)
            i += 1
        else:
            continue
        i += 1
    assert checked >= 5 and 0 < len(removed) < len(edges)


@pytest.mark.parametrize("positions,all_positions", [(False, False), (True, False), (True, True)])
def test_acdc_decisions_do_not_depend_on_batch_hypotheses(checkpoint, positions, all_positions):
    directory, _, _ = checkpoint
    weights = load_redwood_weights(directory)
    clean, corrupt = token_pairs(batch=4, pos=6, seed=4)
    runs = [Acdc(weights, (clean, corrupt), tau=3e-3, positions=positions,
                 all_positions=all_positions, dtype=torch.float64, batch_hypotheses=k)
            for k in (1, 4)]
    traces = [run.run() for run in runs]
    assert runs[1].final_metric_from_scratch() == pytest.approx(runs[1].current_metric, abs=1e-12)
    decisions = [[s.removed for s in t.steps] for t in traces]
    assert decisions[0] == decisions[1]
    assert 0 < sum(decisions[0]) < len(decisions[0])
    for a, b in zip(traces[0].steps, traces[1].steps, strict=True):
        assert a.metric_after == pytest.approx(b.metric_after, abs=1e-12)


def test_loader_refuses_what_it_cannot_read(checkpoint, tmp_path):
    """The shortformer loader names what is wrong with a checkpoint it cannot read."""
    _, sd, cfg = checkpoint
    with pytest.raises(ModelLoadError, match="not 'shortformer'"):
        weights_from_state_dict(sd, {**cfg, "shortformer_pos": False})
    with pytest.raises(ModelLoadError, match=r"unexpected weights \['blocks.0.mlp.W_in'\]"):
        weights_from_state_dict({**sd, "blocks.0.mlp.W_in": torch.zeros(1)}, cfg)
    wrong = r"wrong shapes: embed.W_E \(50, 16\) \(expected \(51, 16\)\)"
    with pytest.raises(ModelLoadError, match=wrong):
        weights_from_state_dict(sd, {**cfg, "d_vocab": 51, "d_vocab_out": 50})
    with pytest.raises(ModelLoadError, match="holds no final.pth"):
        load_redwood_weights(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_redwood_weights(tmp_path / "nowhere")
    (tmp_path / "final.pth").write_text("not a checkpoint")
    with pytest.raises(ModelLoadError, match="could not read"):
        load_redwood_weights(tmp_path)

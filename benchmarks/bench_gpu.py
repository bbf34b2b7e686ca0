"""ACDC at GPT-2-small scale, prepared for a lent GPU (issue 7's benchmark; runs on CPU, slowly).

Model: GPT-2 small's shape (12 layers, 12 heads, d_model 768, vocabulary 50257) with random weights
from seed 0, built by ``transformers`` (the device machine has no hub and no TransformerLens),
converted to the engine's ``TransformerWeights`` and checked against the Hugging Face forward.
Data: 50 random prompt pairs of 15 tokens. ACDC: KL at the last position, resample ablation.

For each mode (``plain``: 32,491 edges; ``positions``: 487,365 edges):

1. a real run from the first edge, for at most ``--seconds`` (``plain`` usually finishes);
2. if it did not finish, *segments*: short runs that start at the first edge into the attention
   heads of a sampled layer, with every earlier edge still in the circuit (recorded as kept);
3. the projected full-run time: the measured prefix, plus, for each remaining destination layer,
   its edge count times the seconds per edge of the nearest sampled segments (interpolated).

Segments start from a circuit with every earlier edge removed (whole runs on this model keep
about 0.1 % of the edges). A real run's few kept paths make their nodes differ between
hypotheses, which costs a little more: read the projection as a slight underestimate.

It reports edges per second, forward-equivalents per edge (against the Hugging Face model's own
forward on the same batch, and against the engine's plain forward), K (hypotheses per pass), the
projection and the peak GPU memory, and writes JSON to stdout and to ``--out``.

    python benchmarks/bench_gpu.py --device cuda --out $OUT/gpu.json
    python benchmarks/bench_gpu.py --tiny            # a 2-layer check of the script on CPU

Modern shapes (issue 13), with ``--shape``: ``llama`` is Llama-3.2-1B's (16 layers, 32 query
heads sharing 8 key/value heads, d_model 2048, SwiGLU MLP of 8192, RMSNorm, rotary with theta
500,000 and llama3 scaling, tied embeddings, vocabulary 128,256) and ``pythia`` Pythia-160m's
(GPT-NeoX: 12 layers, 12 heads, d_model 768, MLP 3072, parallel attention and MLP, rotary on
25 % of each head, vocabulary 50,304). Both are built from ``transformers`` configs with random
weights from seed 0 (no download) and booted through TransformerLens 4
(``TransformerBridge.boot_transformers``); the engine reads them through the adapter, which
checks its forward against the bridge's. Forward-equivalents per edge are against the bridge's
own forward on the same batch (and, stricter, the engine's plain forward). ``--cpu-segment``
runs a reduced version of each on a CPU in a minute or two: ``--layers`` layers (2), widths and
vocabulary unchanged, 8 prompts of 8 tokens, the first ``--edges`` edges (100) of the visit
order (Out, the top MLP) and as many from the first edge into the top block's attention.

    python benchmarks/bench_gpu.py --shape pythia --device cuda --out $OUT/pythia.json
    python benchmarks/bench_gpu.py --shape llama,pythia --cpu-segment
"""

from __future__ import annotations

import argparse
import gc
import importlib.machinery
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a bare checkout

from acdc_viz.acdc import Acdc, ApproximateWarning, hypothesis_memory
from acdc_viz.data import TokenPairs
from acdc_viz.models.adapter import LayerWeights, Norm, TransformerWeights, from_model


def hf_gpt2(n_layer: int, n_head: int, d_model: int, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=d_model, vocab_size=vocab, n_positions=64
    )
    return GPT2LMHeadModel(cfg).eval()


def weights_from_hf(hf) -> TransformerWeights:
    """The engine's view of a Hugging Face GPT-2 (Conv1D weights are (in, out))."""
    cfg, sd = hf.config, {k: v.detach() for k, v in hf.state_dict().items()}
    d, n_heads = cfg.n_embd, cfg.n_head
    d_head = d // n_heads

    def heads_in(w):           # (d, n_heads * d_head) -> (n_heads, d, d_head)
        return w.view(d, n_heads, d_head).permute(1, 0, 2).contiguous()

    layers = []
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        W_q, W_k, W_v = sd[p + "attn.c_attn.weight"].split(d, dim=1)
        b_q, b_k, b_v = sd[p + "attn.c_attn.bias"].split(d)
        layers.append(
            LayerWeights(
                ln1=Norm("LN", cfg.layer_norm_epsilon, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]),
                W_Q=heads_in(W_q),
                b_Q=b_q.view(n_heads, d_head),
                W_K=heads_in(W_k),
                b_K=b_k.view(n_heads, d_head),
                W_V=heads_in(W_v),
                b_V=b_v.view(n_heads, d_head),
                W_O=sd[p + "attn.c_proj.weight"].view(n_heads, d_head, d),
                b_O=sd[p + "attn.c_proj.bias"],
                attn_scale=d_head**0.5,
                ln2=Norm("LN", cfg.layer_norm_epsilon, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"]),
                W_in=sd[p + "mlp.c_fc.weight"],
                b_in=sd[p + "mlp.c_fc.bias"],
                W_out=sd[p + "mlp.c_proj.weight"],
                b_out=sd[p + "mlp.c_proj.bias"],
            )
        )
    W_E = sd["transformer.wte.weight"]
    return TransformerWeights(
        W_E=W_E,
        W_pos=sd["transformer.wpe.weight"],
        layers=layers,
        ln_final=Norm(
            "LN", cfg.layer_norm_epsilon, sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
        ),
        W_U=W_E.T.contiguous(),
        b_U=torch.zeros(W_E.shape[0]),
        act=lambda x: F.gelu(x, approximate="tanh"),
        causal=True,
        n_heads=n_heads,
        attn_only=False,
        d_vocab=W_E.shape[0],
        n_ctx=cfg.n_positions,
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn, device: str, repeats: int = 10) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def walk(acdc: Acdc, start: int, seconds: float, device: str, max_edges: int | None = None) -> dict:
    """Run ``acdc`` from edge ``start`` for ``seconds``. Earlier edges are removed, as whole runs
    on this model remove all but about 0.1 % of them, and the run goes on from that circuit's
    metric (recorded on the skipped steps, which are not timed)."""
    skipped = acdc.graph.edges[len(acdc.trace.steps): start]
    if skipped:
        for edge in skipped:
            acdc.runner.set_removed(edge, True)
        acdc.current_metric = acdc.final_metric_from_scratch()
        for _ in skipped:
            acdc.trace.record(acdc.current_metric, True)
    n, removed, t0, decisions = 0, 0, time.perf_counter(), []
    for step in acdc.steps():
        n += 1
        removed += step.removed
        decisions.append(step.removed)
        if time.perf_counter() - t0 > seconds or n == max_edges:
            break
    sync(device)
    elapsed = time.perf_counter() - t0
    return {"start": start, "edges": n, "removed": removed, "seconds": round(elapsed, 3),
            "seconds_per_edge": elapsed / max(n, 1), "end": start + n,
            "complete": acdc.done, "k": acdc.batch_hypotheses, "decisions": decisions}


def dest_layer(edge, n_layers: int) -> int:
    return n_layers if edge.dest.kind == "out" else edge.dest.layer


def project(acdc: Acdc, prefix: dict, segments: list[dict]) -> float:
    """Projected seconds for the whole run: the measured prefix plus, per destination layer, its
    remaining edges times the interpolated seconds per edge of the sampled segments."""
    n_layers = acdc.weights.n_layers
    edges = acdc.graph.edges
    points = sorted(
        (dest_layer(edges[s["start"]], n_layers), s["seconds_per_edge"]) for s in segments
    )
    points.append(
        (dest_layer(edges[max(prefix["end"] - 1, 0)], n_layers), prefix["seconds_per_edge"])
    )
    points.sort()

    def cost(layer: int) -> float:
        below = [p for p in points if p[0] <= layer]
        above = [p for p in points if p[0] >= layer]
        lo, hi = (below[-1] if below else above[0]), (above[0] if above else below[-1])
        if hi[0] == lo[0]:
            return lo[1]
        return lo[1] + (hi[1] - lo[1]) * (layer - lo[0]) / (hi[0] - lo[0])

    total = prefix["seconds"]
    for e in edges[prefix["end"]:]:
        total += cost(dest_layer(e, n_layers))
    return total


def bench_mode(weights, pairs, args, positions: bool, forward_s: float, out: dict, k: int | None,
               dtype=torch.float32, seconds: float | None = None) -> dict:
    """One mode's run: from the first edge for ``seconds`` (``args.seconds``), then, if it did not
    finish, segments at sampled layers and the projected full run; speed as edges per second and
    forward-equivalents per edge (against ``forward_s``), K, passes and peak GPU memory."""
    device = args.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    kw = {
        "tau": args.tau,
        "positions": positions,
        "device": device,
        "dtype": dtype,
        "batch_hypotheses": k,
    }
    t0 = time.perf_counter()
    acdc = Acdc(weights, pairs, **kw)
    setup = time.perf_counter() - t0
    prefix = walk(acdc, 0, seconds or args.seconds, device)
    decisions = prefix.pop("decisions")
    result = {
        "positions": positions,
        "dtype": str(dtype).removeprefix("torch."),
        "edges_total": acdc.n_edges,
        "k": acdc.batch_hypotheses,
        "setup_seconds": round(setup, 2),
        "prefix": prefix,
    }
    if prefix["complete"]:
        result["full_run_seconds"] = prefix["seconds"]
        result["kept_edges"] = acdc.kept_edges
        result["trace"] = acdc.trace
    else:
        segments = []
        edges = acdc.graph.edges
        n_layers = weights.n_layers
        for layer in sorted(
            {round(x) for x in torch.linspace(n_layers - 2, 0, args.samples).tolist()}, reverse=True
        ):
            start = next(
                i for i, e in enumerate(edges) if e.dest.kind in "qkv" and e.dest.layer == layer
            )
            if start < prefix["end"]:
                continue
            seg = walk(Acdc(weights, pairs, **kw), start, args.segment_seconds, device)
            del seg["decisions"]
            seg["layer"] = layer
            segments.append(seg)
        result["segments"] = segments
        result["projected_full_run_seconds"] = round(project(acdc, prefix, segments), 1)
    steps = acdc.trace.steps[prefix["start"]: prefix["end"]]
    result["passes_prefix"] = sum(
        1 for st in steps if st.seconds > 0
    )  # a chain books its time on its first step
    result["mean_chain_length_prefix"] = round(len(steps) / max(result["passes_prefix"], 1), 1)
    result["decisions_prefix"] = decisions
    spe = [prefix["seconds_per_edge"]] + [s["seconds_per_edge"] for s in result.get("segments", [])]
    result["edges_per_second_prefix"] = round(1 / prefix["seconds_per_edge"], 1)
    total = result.get("full_run_seconds") or result["projected_full_run_seconds"]
    result["edges_per_second_full"] = round(acdc.n_edges / total, 1)
    result["forward_equivalents_per_edge"] = round(total / acdc.n_edges / forward_s, 3)
    result["sampled_seconds_per_edge"] = [round(x, 5) for x in spe]
    if device.startswith("cuda"):
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def run_modes(weights: TransformerWeights, pairs: TokenPairs, args, modes: dict,
              forward_s: float, emit, quick: bool = False) -> None:
    """Each mode of ``args.modes`` (``plain``, ``positions``) into ``modes``: the run (measured
    or projected), its first decisions against a K = 1 run, a K = 1 segment at the top heads,
    and for ``plain`` with ``--flips`` the same run in bfloat16 with the decisions that differ.
    ``emit()`` is called after every stage, so that a timeout keeps what was measured."""
    dev = args.device
    for mode in args.modes.split(","):
        positions = mode == "positions"
        res = bench_mode(weights, pairs, args, positions, forward_s, modes, args.k,
                         seconds=args.positions_seconds if positions else args.seconds)
        trace = res.pop("trace", None)
        decisions = res.pop("decisions_prefix")
        modes[mode] = res
        emit()

        def k1_run(positions: bool = positions) -> Acdc:
            """A fresh run of this mode with one hypothesis per pass (the reference decisions)."""
            return Acdc(weights, pairs, tau=args.tau, positions=positions, device=dev,
                        batch_hypotheses=1)

        if args.check_edges > 0:
            check = walk(k1_run(), 0, 1e9 if quick else 60.0, dev, max_edges=args.check_edges)
            n = min(check["edges"], len(decisions))
            res["k1_check"] = {
                "edges": n,
                "seconds": check["seconds"],
                "decisions_differing": sum(
                    a != b for a, b in zip(check.pop("decisions"), decisions[:n], strict=False)
                ),
            }
            emit()
        if args.k1_seconds > 0 and res["k"] > 1:
            run = k1_run()
            start = next(i for i, e in enumerate(run.graph.edges) if e.dest.kind in "qkv")
            k1 = walk(run, start, args.k1_seconds, dev)
            del k1["decisions"]
            res["k1_top_heads_segment"] = k1
            emit()
        if args.flips and not positions and trace is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ApproximateWarning)
                half = bench_mode(weights, pairs, args, False, forward_s, modes, args.k,
                                  torch.bfloat16)
            half_trace = half.pop("trace", None)
            half.pop("decisions_prefix", None)
            if half_trace is not None:
                pairs_of_steps = list(zip(trace.steps, half_trace.steps, strict=False))
                differ = [i for i, (a, b) in enumerate(pairs_of_steps) if a.removed != b.removed]
                kept32, kept16 = set(trace.final_kept_edges), set(half_trace.final_kept_edges)
                half["decisions_differing"] = len(differ)
                half["first_flip_step"] = differ[0] if differ else None
                half["final_circuit_symmetric_difference"] = len(kept32 ^ kept16)
                half["kept_fp32"], half["kept_bf16"] = len(kept32), len(kept16)
            modes["plain_bf16"] = half
            emit()


def machine(device: str) -> dict:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
    }


def reset_peak_memory(device: str) -> None:
    """Start measuring the peak memory again (on a CPU: Linux's peak resident set, VmHWM)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass                          # not Linux: the peak is the process's since it started


def peak_memory_gib(device: str) -> dict:
    """The peak memory since ``reset_peak_memory``: allocated on the GPU, or the process's
    resident set on a CPU (which includes building the model)."""
    if device.startswith("cuda"):
        return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        kib = int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
    except (OSError, StopIteration, ValueError):
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # KiB on Linux
    return {"peak_process_rss_gib": round(kib / 2**20, 2)}


# ----- modern shapes (issue 13) -----------------------------------------------------------------


def llama_config(layers: int):
    """Llama-3.2-1B's config (its published values) with ``layers`` layers."""
    from transformers import LlamaConfig

    # rope_theta and rope_scaling: the names of transformers 4, which 5 still reads
    rope: dict = {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}
    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, hidden_act="silu",
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001, **rope,
    )


def pythia_config(layers: int):
    """Pythia-160m's config (GPT-NeoX, its published values) with ``layers`` layers."""
    from transformers import GPTNeoXConfig

    rope: dict = {"rotary_pct": 0.25, "rotary_emb_base": 10000}   # transformers 4's names
    return GPTNeoXConfig(
        vocab_size=50304, hidden_size=768, intermediate_size=3072, num_hidden_layers=layers,
        num_attention_heads=12, max_position_embeddings=2048, hidden_act="gelu",
        use_parallel_residual=True, layer_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, **rope,
    )


#: name -> (description, config builder, Hugging Face model class, layers of the full shape)
SHAPES = {
    "llama": ("Llama-3.2-1B shape, random (seed 0)", llama_config, "LlamaForCausalLM", 16),
    "pythia": ("Pythia-160m shape, random (seed 0)", pythia_config, "GPTNeoXForCausalLM", 12),
}


def offline_stand_ins() -> list[str]:
    """Empty stand-ins for ``datasets`` and ``pandas`` where they are not installed.

    TransformerLens 4.3 imports both at import time, for dataset and evaluation utilities that
    this benchmark never calls; the device machine lacks them, and ``pyarrow`` (which
    ``datasets`` needs) is too large to carry there. Anything that does call them raises
    ImportError. Returns the packages stood in for (recorded in the report).
    """

    def unavailable(*args, **kwargs):
        raise ImportError("not installed (a stand-in registered by benchmarks/bench_gpu.py)")

    names = []
    for package in ("datasets", "pandas"):
        if importlib.util.find_spec(package) is not None:
            continue
        for name in (package, f"{package}.arrow_dataset", f"{package}.iterable_dataset",
                     f"{package}.load"):
            module = types.ModuleType(name)
            module.__dict__.update(
                __spec__=importlib.machinery.ModuleSpec(name, None), __path__=[],
                Dataset=unavailable, IterableDataset=unavailable, load_dataset=unavailable,
                DataFrame=unavailable)
            sys.modules[name] = module
        names.append(package)
    return names


def boot_shape(shape: str, layers: int, device: str, directory: str):
    """The shape's model with ``layers`` layers: random weights from seed 0, built on
    ``device``, booted through TransformerLens 4 with a placeholder tokenizer (only its config
    is saved to ``directory``: the bridge wraps the model it is given)."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    placeholder_tokenizer = importlib.import_module("model_families").placeholder_tokenizer

    _, make_config, class_name, _ = SHAPES[shape]
    config = make_config(layers)
    config._attn_implementation = "eager"            # what the bridge uses anyway
    config.save_pretrained(directory)
    torch.manual_seed(0)
    with torch.device(device):
        hf = getattr(transformers, class_name)(config).eval()
    tokenizer = placeholder_tokenizer(config.vocab_size, config.eos_token_id)
    bridge = TransformerBridge.boot_transformers(directory, hf_model=hf, device=device,
                                                 dtype=torch.float32, tokenizer=tokenizer)
    return bridge.eval()


def cpu_segments(weights: TransformerWeights, pairs: TokenPairs, args) -> dict:
    """Two segments of ``args.edges`` edges: from the first edge of the visit order (Out and the
    top MLP, whose hypotheses each need their own logits), and from the first edge into the top
    block's attention (the kind of edge that most of a run tests), with every earlier edge
    removed (as ``walk`` does)."""
    out = {}
    graph = weights.circuit_graph()
    top = next(i for i, e in enumerate(graph.edges) if e.dest.kind in "qkv")
    for name, start in (("from_out", 0), ("from_top_attention", top)):
        acdc = Acdc(weights, pairs, tau=args.tau, device=args.device, batch_hypotheses=args.k)
        seg = walk(acdc, start, 1e9, args.device, max_edges=args.edges)
        seg.pop("decisions")
        steps = acdc.trace.steps[start: seg["end"]]
        seg["passes"] = sum(1 for st in steps if st.seconds > 0)
        out[name] = seg
    return out


def time_forwards(bridge, weights: TransformerWeights, tokens: torch.Tensor, device: str,
                  repeats: int) -> tuple[float, float]:
    """Seconds of one plain forward pass of the bridge and of the engine (medians)."""
    with torch.no_grad():
        return (time_call(lambda: bridge(tokens), device, repeats),
                time_call(lambda: weights.forward(tokens), device, repeats))


def bench_shape(shape: str, args, report: dict, emit) -> None:
    """One modern shape into ``report["shapes"][shape]``: boot, read and check the weights, time
    the forward passes, then the CPU segments or the GPU run (``run_modes``)."""
    description, _, _, full_layers = SHAPES[shape]
    dev = args.device
    layers = args.layers or (2 if args.cpu_segment else full_layers)
    batch, seq = args.prompts or ((8, 8) if args.cpu_segment else (50, 15))
    res: dict = {"model": description + (f", {layers} layers" if layers != full_layers else ""),
                 "prompts": [batch, seq]}
    report["shapes"][shape] = res
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        bridge = boot_shape(shape, layers, dev, directory)
    res["boot_seconds"] = round(time.perf_counter() - t0, 1)
    vocab = int(bridge.cfg.d_vocab)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (batch, seq), generator=g)
    corrupt = torch.randint(0, vocab, (batch, seq), generator=g)
    pairs = TokenPairs(clean, corrupt)
    dev_clean = clean.to(dev)
    weights = from_model(bridge, dev_clean[:4])      # checks the engine's forward against it
    bridge_fwd, engine_fwd = time_forwards(bridge, weights, dev_clean, dev,
                                           5 if args.cpu_segment else 10)
    if not args.cpu_segment:         # room for the run (the engine has its own copy)
        del bridge
        gc.collect()
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    graph = weights.circuit_graph()
    need = hypothesis_memory(weights, batch, seq)
    res.update({
        "layers": layers, "heads": weights.n_heads, "kv_heads": weights.n_kv_heads,
        "d_model": int(weights.W_E.shape[1]), "vocab": vocab, "parallel": weights.parallel,
        "gated_mlp": weights.layers[0].W_gate is not None, "edges_plain": len(graph.edges),
        "bridge_forward_ms": round(bridge_fwd * 1e3, 2),
        "engine_forward_ms": round(engine_fwd * 1e3, 2),
        "estimated_mib_per_hypothesis": round(need.total / 2**20, 1),
        "estimate_terms_mib": {k: round(v / 2**20, 1) for k, v in need._asdict().items()},
    })
    if dev.startswith("cuda"):
        free, total = torch.cuda.mem_get_info()
        res["gpu_free_gib_before_runs"] = round(free / 2**30, 1)
    emit()
    if args.cpu_segment:
        res["segments"] = segments = cpu_segments(weights, pairs, args)
        res.update(peak_memory_gib(dev))
        # the forward passes again, after the segments, to average out the machine's noise
        after = time_forwards(bridge, weights, dev_clean, dev, 5)
        res["bridge_forward_ms_before_after"] = [round(bridge_fwd * 1e3, 2),
                                                 round(after[0] * 1e3, 2)]
        bridge_fwd, engine_fwd = (bridge_fwd + after[0]) / 2, (engine_fwd + after[1]) / 2
        res["bridge_forward_ms"] = round(bridge_fwd * 1e3, 2)
        res["engine_forward_ms"] = round(engine_fwd * 1e3, 2)
        for seg in segments.values():
            per_edge = seg["seconds_per_edge"]
            seg["seconds_per_edge"] = round(per_edge, 5)
            seg["forward_equivalents_per_edge"] = round(per_edge / bridge_fwd, 3)
            seg["forward_equivalents_per_edge_vs_engine_forward"] = round(per_edge / engine_fwd, 3)
        emit()
        return
    res["modes"] = {}
    run_modes(weights, pairs, args, res["modes"], bridge_fwd, emit)
    res.update(peak_memory_gib(dev))
    emit()


def main() -> None:
    """GPT-2 small's shape (or ``--tiny``) in each mode, checks and profile; or, with
    ``--shape``, the modern shapes (``main_shapes``)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="gpt2",
                        help="gpt2 (default), or llama, pythia or both (comma-separated)")
    parser.add_argument("--tau", type=float, default=1e-3)
    parser.add_argument("--modes", default="plain,positions")
    parser.add_argument(
        "--seconds", type=float, default=150.0, help="cap of each real run from the start"
    )
    parser.add_argument(
        "--positions-seconds", type=float, default=60.0, help="the same, position mode"
    )
    parser.add_argument("--segment-seconds", type=float, default=20.0)
    parser.add_argument("--samples", type=int, default=4, help="sampled layers per mode")
    parser.add_argument("--k", type=int, default=None, help="hypotheses per pass (default: auto)")
    parser.add_argument(
        "--k1-seconds", type=float, default=15.0, help="also time K=1 this long (0: skip)"
    )
    parser.add_argument(
        "--profile", type=int, default=0, help="profile the first N edges of a plain run"
    )
    parser.add_argument("--check-edges", type=int, default=3000,
                        help="compare the first N decisions with a K=1 run (0: skip)")
    parser.add_argument(
        "--flips", action="store_true", help="also run plain in bfloat16, count flips"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="2 layers, d 64: check the script quickly"
    )
    parser.add_argument("--cpu-segment", action="store_true",
                        help="llama/pythia: the reduced CPU version (--layers, --edges)")
    parser.add_argument("--layers", type=int, default=None,
                        help="llama/pythia: layers (default: the shape's; 2 with --cpu-segment)")
    parser.add_argument("--prompts", type=lambda text: tuple(map(int, text.split("x"))),
                        default=None, help="llama/pythia: BATCHxTOKENS (default: 50x15; "
                        "8x8 with --cpu-segment)")
    parser.add_argument("--edges", type=int, default=100,
                        help="edges per segment of the reduced version")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.shape != "gpt2":
        main_shapes(args)
        return

    shape = (2, 4, 64, 1000) if args.tiny else (12, 12, 768, 50257)
    hf = hf_gpt2(*shape)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, shape[3], (50, 15), generator=g)
    corrupt = torch.randint(0, shape[3], (50, 15), generator=g)
    weights = weights_from_hf(hf)
    with torch.no_grad():
        err = (weights.forward(clean) - hf(clean).logits).abs().max().item()
    assert err < 1e-3, f"the converted weights disagree with the Hugging Face forward: {err}"
    dev = args.device
    hf, weights = hf.to(dev), weights.to(dev)
    dev_clean = clean.to(dev)
    with torch.no_grad():
        hf_fwd = time_call(lambda: hf(dev_clean), dev)
        engine_fwd = time_call(lambda: weights.forward(dev_clean), dev)
    pairs = TokenPairs(clean, corrupt)
    report: dict = {
        "benchmark": "acdc_gpu",
        "model": "gpt2-small shape, random (seed 0)" if not args.tiny else "tiny",
        "prompts": list(clean.shape),
        "tau": args.tau,
        "device": dev,
        "hf_forward_ms": round(hf_fwd * 1e3, 3),
        "engine_forward_ms": round(engine_fwd * 1e3, 3),
        "machine": machine(dev),
        "modes": {},
    }

    def emit() -> None:
        text = json.dumps(report, indent=1, default=lambda o: None)
        if args.out:
            Path(args.out).write_text(text)
        print(text, flush=True)

    run_modes(weights, pairs, args, report["modes"], hf_fwd, emit, quick=args.tiny)
    if args.profile > 0:          # where the time of the first edges goes (top operators)
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
        with profile(activities=acts) as prof:
            walk(
                Acdc(weights, pairs, tau=args.tau, device=dev), 0, 1e9, dev, max_edges=args.profile
            )
        key = "self_cuda_time_total" if dev.startswith("cuda") else "self_cpu_time_total"
        report["profile"] = prof.key_averages().table(sort_by=key, row_limit=15)
        emit()
    if not math.isfinite(report["hf_forward_ms"]):
        raise SystemExit(1)


def main_shapes(args) -> None:
    """``--shape llama,pythia``: each shape in turn; a shape that fails is reported (its error
    in the JSON) and the next one runs."""
    report: dict = {
        "benchmark": "acdc_gpu_shapes",
        "cpu_segment": args.cpu_segment,
        "tau": args.tau,
        "device": args.device,
        "machine": machine(args.device),
        "stand_ins": offline_stand_ins(),
        "shapes": {},
    }

    def emit() -> None:
        text = json.dumps(report, indent=1, default=lambda o: None)
        if args.out:
            Path(args.out).write_text(text)
        print(text, flush=True)

    failed = False
    for shape in args.shape.split(","):
        try:
            bench_shape(shape, args, report, emit)
        except Exception as exc:        # report it and go on with the next shape
            failed = True
            traceback.print_exc()
            report["shapes"].setdefault(shape, {})["error"] = f"{type(exc).__name__}: {exc}"
            emit()
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

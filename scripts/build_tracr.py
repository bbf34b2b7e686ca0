"""Build the bundled tracr models, tracr-reverse and tracr-proportion (dev only: needs tracr).

    python -m venv --system-site-packages /tmp/tracr-venv
    /tmp/tracr-venv/bin/pip install tracr-pypi==1.0.0     # brings jax, dm-haiku, chex
    /tmp/tracr-venv/bin/python scripts/build_tracr.py      # --out DIR to write elsewhere

For each of the two RASP programs of the ACDC paper it:

1. compiles the program with tracr;
2. converts the compiled model into a native TransformerLens 4 bridge;
3. checks that the bridge's outputs equal tracr's own compiled model on every input (every
   sequence after BOS of length 0 to max_seq_len), and records tracr's outputs in
   ``bundled/tracr-reference/{name}.json`` for the tests, which run without JAX;
4. derives the canonical circuit from tracr's residual bookkeeping for every prompt length,
   verifies it by zero ablation (``acdc_viz.tasks.tracr.derive_circuit``), and cross-checks the
   task's prompt length with the hooked slow path (``acdc_viz.hooked``);
5. writes ``bundled/{name}.safetensors`` and ``bundled/{name}.json`` (``save_bundled``).

Deterministic: tracr initialises with ``PRNGKey(0)`` and then overwrites every weight, and
the numbers in RASP labels (``length_3``) come from a process-global counter, which is reset
before each program so that the residual basis (sorted by label) does not depend on what was
compiled before. Two builds give byte-identical files.

Time on the 2-core CPU machine (shared, under load): about 25 s in all. Compiling takes about
5 s for reverse and 2 s for proportion. The equality check over 364 + 1,365 inputs and the
circuit derivation take about 13 s. Importing JAX and TransformerLens takes the rest.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acdc_viz.tasks import tracr as tasks_tracr
from acdc_viz.tasks.bundled import BUNDLED_DIR, save_bundled

BOS = "BOS"
MAX_SEQ_LEN = 5
OUTPUT_ATOL = 1e-5

REVERSE_SOURCE = """\
length = SelectorWidth(Select(tokens, tokens, TRUE)).named("length")
opp_idx = (length - indices).named("opp_idx")
opp_idx = (opp_idx - 1).named("opp_idx-1")
reverse = Aggregate(Select(indices, opp_idx, EQ), tokens).named("reverse")
compile(reverse, vocab={1, 2, 3}, max_seq_len=5, compiler_bos="BOS")"""

PROPORTION_SOURCE = """\
frac_prevs = make_frac_prevs((tokens == "x").named("is_x"))   # tracr.compiler.lib
compile(frac_prevs, vocab={"w", "x", "y", "z"}, max_seq_len=5, compiler_bos="BOS")"""


def reverse_program() -> tuple[Any, set[Any]]:
    """The ACDC code's reverse program (the names only make the residual labels readable)."""
    from tracr.rasp import rasp

    length = rasp.SelectorWidth(rasp.Select(rasp.tokens, rasp.tokens, rasp.Comparison.TRUE)).named(
        "length"
    )
    opp_idx = (length - rasp.indices).named("opp_idx")
    opp_idx = (opp_idx - 1).named("opp_idx-1")
    flip = rasp.Select(rasp.indices, opp_idx, rasp.Comparison.EQ)
    return rasp.Aggregate(flip, rasp.tokens).named("reverse"), {1, 2, 3}


def proportion_program() -> tuple[Any, set[Any]]:
    """The ACDC code's proportion program: the running fraction of "x"."""
    from tracr.compiler import lib
    from tracr.rasp import rasp

    return lib.make_frac_prevs((rasp.tokens == "x").named("is_x")), {"w", "x", "y", "z"}


PROGRAMS: dict[str, tuple[Callable[[], tuple[Any, set[Any]]], str]] = {
    "tracr-reverse": (reverse_program, REVERSE_SOURCE),
    "tracr-proportion": (proportion_program, PROPORTION_SOURCE),
}


def compile_program(name: str) -> tuple[Any, Any]:
    from tracr.compiler import compiling
    from tracr.rasp import rasp

    rasp.RASPExpr._ids = itertools.count(1)  # label numbers must not depend on earlier programs
    program, vocab = PROGRAMS[name][0]()
    compiled = compiling.compile_rasp_to_model(program, vocab=vocab, max_seq_len=MAX_SEQ_LEN,
                                               compiler_bos=BOS)
    return program, compiled


def output_directions(program: Any, compiled: Any) -> tuple[list[int], list[str] | None]:
    """Residual indices that tracr unembeds, in output-id order, and the output tokens (None if
    numeric)."""
    from tracr.rasp import rasp

    labels = compiled.residual_labels
    if rasp.is_categorical(program):
        outputs = sorted(compiled.output_encoder.encoding_map.items(), key=lambda kv: kv[1])
        return [labels.index(f"{program.label}:{value}") for value, _ in outputs], [
            str(v) for v, _ in outputs
        ]
    return [labels.index(program.label)], None


def convert(program: Any, compiled: Any) -> tuple[Any, dict[str, Any]]:
    """A native TransformerLens 4 bridge with tracr's weights, and its config kwargs.

    tracr's blocks are (attention, MLP) pairs like TransformerLens', with all-zero weights for a
    half that the program does not use, so the layers map one to one. No LayerNorm, bidirectional
    attention scaled by 1/sqrt(key_size), ReLU MLPs, zero biases. The unembedding picks the
    output variable's directions: one per output token, or the single numeric direction.
    """
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    p = {
        k: {kk: np.asarray(vv, dtype=np.float32) for kk, vv in v.items()}
        for k, v in compiled.params.items()
    }
    mc = compiled.model_config
    assert not mc.layer_norm and not mc.causal, (
        "the ACDC programs compile without LayerNorm, non-causal"
    )
    out_dirs, _ = output_directions(program, compiled)
    d_model = len(compiled.residual_labels)
    config = {
        "d_model": d_model, "d_head": int(mc.key_size), "n_layers": int(mc.num_layers),
        "n_heads": int(mc.num_heads), "d_mlp": int(mc.mlp_hidden_size),
        "n_ctx": int(p["pos_embed"]["embeddings"].shape[0]),
        "d_vocab": int(p["token_embed"]["embeddings"].shape[0]), "d_vocab_out": len(out_dirs),
        "normalization_type": None, "attention_dir": "bidirectional", "act_fn": "relu",
        "attn_only": False, "seed": 0,
    }
    heads, d_head = config["n_heads"], config["d_head"]
    assert p["transformer/layer_0/attn/query"]["w"].shape[1] == heads * d_head

    state = {
        "embed.weight": p["token_embed"]["embeddings"],
        "pos_embed.weight": p["pos_embed"]["embeddings"],
    }
    for layer in range(config["n_layers"]):
        tracr_layer = f"transformer/layer_{layer}"
        ours = {
            "attn.q": "attn/query",
            "attn.k": "attn/key",
            "attn.v": "attn/value",
            "attn.o": "attn/linear",
            "mlp.in": "mlp/linear_1",
            "mlp.out": "mlp/linear_2",
        }
        for tl_name, tracr_name in ours.items():   # haiku stores (in, out); torch Linear (out, in)
            state[f"blocks.{layer}.{tl_name}.weight"] = p[f"{tracr_layer}/{tracr_name}"]["w"].T
            state[f"blocks.{layer}.{tl_name}.bias"] = p[f"{tracr_layer}/{tracr_name}"]["b"]
    unembed = np.zeros((len(out_dirs), d_model), dtype=np.float32)
    unembed[np.arange(len(out_dirs)), out_dirs] = 1.0
    state["unembed.weight"] = unembed
    state["unembed.bias"] = np.zeros(len(out_dirs), dtype=np.float32)

    bridge = TransformerBridge.boot_native(TransformerBridgeConfig(**config), device="cpu")
    bridge.load_state_dict(
        {k: torch.tensor(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True
    )
    bridge.eval()
    return bridge, config


def _f32(x: float) -> float:
    return float(f"{float(x):.9g}")   # enough digits to round-trip float32


def tracr_reference(program: Any, compiled: Any) -> dict[str, Any]:
    """tracr's outputs on every input, batched by length: output space and decoded values."""
    import jax
    import jax.numpy as jnp

    forward = jax.jit(compiled.forward)
    out_dirs, _ = output_directions(program, compiled)
    enc = compiled.input_encoder
    words = sorted(v for v in enc.encoding_map if v not in (enc.bos_token, enc.pad_token))
    inputs, outputs, decoded = {}, {}, {}
    for length in range(MAX_SEQ_LEN + 1):
        rows = [enc.encode([BOS, *seq]) for seq in itertools.product(words, repeat=length)]
        result = forward(compiled.params, jnp.array(rows))
        space = np.asarray(result.transformer_output.output)[..., out_dirs]
        unembedded = np.asarray(result.unembedded_output).tolist()
        key = str(length + 1)
        inputs[key] = rows
        outputs[key] = [[[_f32(v) for v in pos] for pos in row] for row in space]
        decoded[key] = [[BOS] + [_decoded(compiled, v) for v in row[1:]] for row in unembedded]
    for seq in ([BOS, *words[:3]], [BOS, words[-1], words[0]]):   # the batched path equals apply()
        applied = compiled.apply(seq).decoded
        row = inputs[str(len(seq))].index(enc.encode(seq))
        recorded = decoded[str(len(seq))][row]
        assert applied[0] == recorded[0] and all(
            _same(a, b) for a, b in zip(applied[1:], recorded[1:], strict=True)
        ), (seq, applied, recorded)
    return {"inputs": inputs, "outputs": outputs, "decoded": decoded}


def _same(a: Any, b: Any) -> bool:
    return abs(a - b) <= OUTPUT_ATOL if isinstance(b, float) else str(a) == b


def _decoded(compiled: Any, value: Any) -> Any:
    if not hasattr(compiled.output_encoder, "encoding_map"):   # numeric output
        return _f32(value)
    return str(compiled.output_encoder.decode([value])[0])


def check_equal(bridge: Any, reference: dict[str, Any], categorical: bool) -> float:
    """Largest difference between the bridge and tracr over every input; raises above tolerance."""
    worst = 0.0
    for key, rows in reference["inputs"].items():
        with torch.no_grad():
            ours = bridge(torch.tensor(rows)).numpy()
        theirs = np.array(reference["outputs"][key], dtype=np.float32)
        worst = max(worst, float(np.abs(ours - theirs).max()))
        if categorical:
            labels = reference["tokens_out"]
            ours_decoded = [
                [BOS] + [labels[i] for i in row[1:]] for row in ours.argmax(-1).tolist()
            ]
            assert ours_decoded == reference["decoded"][key], (
                f"decoded outputs differ at length {key}"
            )
    if worst > OUTPUT_ATOL:
        raise AssertionError(f"the converted model differs from tracr by {worst:.3g}")
    return worst


def check_with_hooks(
    bridge: Any, tokens: torch.Tensor, circuit: list[str], positions: bool
) -> float:
    """Zero-ablate everything outside ``circuit`` with the hooked slow path (an independent
    forward)."""
    from acdc_viz.graph import CircuitGraph
    from acdc_viz.hooked import hooked_logits

    graph = CircuitGraph.from_config(bridge.cfg, n_positions=tokens.shape[1] if positions else None)
    removed = [e for e in graph.edges if e.name not in set(circuit)]
    with torch.no_grad():
        full = bridge(tokens)
    ablated = hooked_logits(bridge, tokens, tokens, removed, "zero", last_position_only=False)
    deviation = float((ablated[:, 1:] - full[:, 1:]).abs().max())
    if deviation > tasks_tracr.EFFECT_TOL:
        raise AssertionError(
            f"the hooked slow path disagrees: outside the circuit moves outputs by {deviation:.3g}"
        )
    return deviation


def build(name: str, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    program, compiled = compile_program(name)
    compile_s = time.perf_counter() - start
    bridge, config = convert(program, compiled)
    _, tokens_out = output_directions(program, compiled)
    enc = compiled.input_encoder
    tokens = [str(t) for t, _ in sorted(enc.encoding_map.items(), key=lambda kv: kv[1])]

    reference = tracr_reference(program, compiled)
    reference["tokens_out"] = tokens_out
    worst = check_equal(bridge, reference, tokens_out is not None)
    n_inputs = sum(len(r) for r in reference["inputs"].values())

    labels = list(compiled.residual_labels)
    circuit: dict[str, Any] = {"edges": {}, "by_position": {}, "effects": {}}
    for length in range(2, MAX_SEQ_LEN + 2):
        derived = tasks_tracr.derive_circuit(
            bridge, labels, torch.tensor(reference["inputs"][str(length)])
        )
        circuit["flow"] = derived.flow
        circuit["edges"][str(length)] = derived.edges
        circuit["by_position"][str(length)] = derived.by_position
        circuit["effects"][str(length)] = derived.effects
    prompt = torch.tensor(reference["inputs"][str(tasks_tracr.PROMPT_TOKENS)])
    check_with_hooks(
        bridge, prompt, circuit["edges"][str(tasks_tracr.PROMPT_TOKENS)], positions=False
    )
    check_with_hooks(
        bridge, prompt, circuit["by_position"][str(tasks_tracr.PROMPT_TOKENS)], positions=True
    )

    build_info = {
        "script": "scripts/build_tracr.py",
        "program": PROGRAMS[name][1],
        "versions": {
            pkg: version(pkg)
            for pkg in ("tracr-pypi", "jax", "dm-haiku", "torch", "transformer-lens")
        },
        "tokens": tokens,
        "bos_token": enc.bos_token,
        "pad_token": enc.pad_token,
        "max_seq_len": MAX_SEQ_LEN,
        "outputs": tokens_out,
        "residual_labels": labels,
        "circuit": circuit,
        "conversion": {"inputs_checked": n_inputs, "max_abs_difference": worst},
    }
    weights = save_bundled(bridge, name, config, build_info, directory=out)
    ref_dir = out / "tracr-reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    reference_file = {
        "task": name,
        "about": "tracr's own compiled model on every input: inputs and outputs keyed by length "
        "(BOS included); outputs are the residual stream's output directions, as the bridge's "
        "logits; decoded is tracr's decoding (BOS at position 0).",
        "program": PROGRAMS[name][1],
        "versions": build_info["versions"],
        **reference,
    }
    (ref_dir / f"{name}.json").write_text(json.dumps(reference_file, separators=(",", ":")) + "\n")
    seconds = time.perf_counter() - start
    summary = {"name": name, "compile_s": round(compile_s, 1), "total_s": round(seconds, 1),
               "inputs_checked": n_inputs, "max_abs_difference": worst,
               "canonical_edges": len(circuit["edges"][str(tasks_tracr.PROMPT_TOKENS)]),
               "flow_edges": len(circuit["flow"]), "weights": str(weights)}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=BUNDLED_DIR, help="where to write (default: the package)"
    )
    parser.add_argument("--only", choices=sorted(PROGRAMS), help="build one model")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)   # tiny matrices: threads only add contention (10x slower on 2 cores)
    for noisy in ("jax", "absl", "transformers", "transformer_lens"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    start = time.perf_counter()
    for name in [args.only] if args.only else PROGRAMS:
        print(json.dumps(build(name, args.out)))
    print(json.dumps({"total_s": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

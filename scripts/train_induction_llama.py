"""Train the bundled Llama-architecture induction model and write it to acdc_viz/tasks/bundled/.

    python scripts/train_induction_llama.py                 # writes induction-llama-2l{/,.json}
    python scripts/train_induction_llama.py --dry-run --steps 500

The model is a ``transformers`` ``LlamaForCausalLM`` (``induction.HF_MODEL_CONFIGS``): rotary
embeddings, grouped-query attention (4 query heads sharing 2 key/value heads), a SwiGLU MLP and
RMSNorm, 2 layers, d_model 64, the task's vocabulary of 64 tokens (``BOS`` = 0). It trains with
torch on the data of ``scripts/train_induction.py`` (its ``training_batch``: one repeated random
segment at a random offset, loss only where induction can predict) with the same optimiser.
Unlike the GPT-2 model it needs no MLP curriculum: with the MLPs trainable from step 0 the
standard previous-token + induction mechanism forms (``docs/induction.md``).

It ships as a Hugging Face directory (``save_pretrained``) with a word-level tokenizer whose
tokens are the task's labels (``BOS``, ``t1`` ... ``t63``), so it loads offline through the same
TransformerLens 4 path as any checkpoint (``TransformerBridge.boot_transformers``).

Reproducible: fixed seeds (model init, data), one CPU thread and deterministic algorithms. After
training it saves the model, loads it back through ``load_bundled`` (the hash-checked loader),
measures every head's previous-token and induction score from ``hook_pattern``, picks the heads
by threshold, derives the canonical circuit (key and value edges named by KV group), checks by
ablation that the circuit alone does the task, and records all of it in the JSON
(``build.train_seconds`` is the measured training time).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_induction as base  # noqa: E402 (this folder): the data, its seeds, the accuracy

from acdc_viz.graph import CircuitGraph  # noqa: E402
from acdc_viz.models.adapter import from_model  # noqa: E402
from acdc_viz.tasks import induction as task  # noqa: E402
from acdc_viz.tasks.bundled import (  # noqa: E402
    BUNDLED_DIR,
    load_bundled,
    save_bundled_transformers,
)

log = logging.getLogger("train_induction_llama")

NAME = task.LLAMA_MODEL
INIT_SEED = 0
HYPERPARAMS: dict[str, float] = {
    "steps": 1000, "batch": 128, "lr": 3e-3, "weight_decay": 0.01, "warmup": 100,
}


class Logits(torch.nn.Module):
    """A causal LM as ``tokens -> logits``, what ``train_induction.induction_accuracy`` calls."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(tokens).logits


def make_tokenizer():
    """A word-level tokenizer whose tokens are the task's labels: ``BOS`` (id 0), ``t1``, ...

    Without a BOS token TransformerLens would set the EOS as BOS; ours is ``BOS`` itself, so the
    bridge's ``to_tokens("t5 t9 t5")`` prepends id 0 as the task's prompts do.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bos = task.token_name(task.BOS)
    backend = Tokenizer(models.WordLevel({task.token_name(i): i for i in range(task.D_VOCAB)},
                                         unk_token=bos))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=bos,
                                   unk_token=bos, pad_token=bos)


def train(hp: dict[str, float], init_seed: int) -> dict:
    """Train the Llama model on ``training_batch`` data; returns it with its history and time.

    AdamW with a linear warmup and a cosine decay, as ``train_induction.py``; the loss is
    cross-entropy at the positions only induction can predict. The history records the loss
    and the accuracy on 200 held-out task prompts every 250 steps.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(init_seed)
    lm = LlamaForCausalLM(LlamaConfig(**task.HF_MODEL_CONFIGS[NAME],
                                      attn_implementation="eager"))
    lm.train()
    logits = Logits(lm)
    opt = torch.optim.AdamW(lm.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"],
                            betas=(0.9, 0.98))
    total, warmup = int(hp["steps"]), int(hp["warmup"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    generator = torch.Generator().manual_seed(base.DATA_SEED)
    held_out = task.make_pairs(200, seed=base.SCORE_SEED + 1)
    history = []
    start = time.perf_counter()
    for step in range(total):
        inputs, targets, mask = base.training_batch(int(hp["batch"]), generator)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(logits(inputs)[mask], targets[mask])
        loss.backward()
        if step == 0 and any(p.grad is None for p in lm.parameters()):
            raise RuntimeError("a parameter of the model gets no gradient")
        opt.step()
        sched.step()
        if step % 250 == 0 or step == total - 1:
            lm.eval()
            accuracy = base.induction_accuracy(logits, held_out)
            lm.train()
            history.append({"step": step, "loss": round(loss.item(), 4),
                            "induction_accuracy": round(accuracy, 4)})
            log.info("step %d loss %.4f induction accuracy %.3f (%.0f s)", step, loss.item(),
                     accuracy, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    return {"lm": lm.eval(), "seconds": seconds, "history": history}


def analyse(bridge) -> dict:
    """Measured on the reloaded bridge: accuracy, head scores, heads, the canonical circuit and
    what each circuit scores alone (every edge, the canonical ones, none, canonical + MLPs)."""
    held_out = task.make_pairs(200, seed=base.SCORE_SEED + 1)
    scores = task.head_scores(bridge, task.make_pairs(base.SCORE_PROMPTS,
                                                      seed=base.SCORE_SEED).clean)
    heads = task.identify_heads(scores)
    pairs = task.make_pairs(task.DEFAULT_PROMPTS, seed=0)
    canonical = task.circuit_edges(heads, False, pairs.seq_len, task.kv_group_size(NAME))
    weights = from_model(bridge, pairs.clean[:4])
    graph = CircuitGraph(weights.n_layers, weights.n_heads, n_kv_heads=weights.n_kv_heads)
    circuits: dict[str, set[str] | None] = {
        "full_model": None,
        "canonical_circuit": canonical,
        "empty_circuit": set(),
        "canonical_plus_mlp_edges": canonical | {
            e.name for e in graph.edges if "mlp" in (e.src.kind, e.dest.kind)},
    }
    check = {}
    for metric in (task.nll_metric(pairs), task.kl_metric(pairs)):
        check[metric.name] = {label: round(task.circuit_metric(weights, pairs, kept, metric), 4)
                              for label, kept in circuits.items()}
    return {
        "induction_accuracy": round(base.induction_accuracy(bridge, held_out), 4),
        "graph_edges": len(graph),
        "head_scores": {k: [[round(s, 4) for s in row] for row in v] for k, v in scores.items()},
        "heads": heads,
        "canonical_edges": sorted(canonical),
        "circuit_check": check,
    }


def main() -> None:
    """Train, save to a scratch folder, analyse the reloaded model, then write the package's."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=HYPERPARAMS["steps"], help="training steps")
    parser.add_argument("--init-seed", type=int, default=INIT_SEED, help="seed of the model init")
    parser.add_argument("--out", type=Path, default=BUNDLED_DIR,
                        help="the folder to write the model's directory and JSON to")
    parser.add_argument("--dry-run", action="store_true", help="print the build record only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    hp = {**HYPERPARAMS, "steps": args.steps}
    result = train(hp, args.init_seed)
    with tempfile.TemporaryDirectory() as scratch:
        save_bundled_transformers(result["lm"], make_tokenizer(), NAME, {}, Path(scratch))
        info = analyse(load_bundled(NAME, directory=Path(scratch)))
    build = {
        "script": "scripts/train_induction_llama.py",
        "architecture": "transformers LlamaForCausalLM (config: induction.HF_MODEL_CONFIGS)",
        "seeds": {"init": args.init_seed, "data": base.DATA_SEED, "scores": base.SCORE_SEED},
        "score_prompts": base.SCORE_PROMPTS,
        "hyperparameters": hp,
        "segment_lengths": list(base.SEGMENT_LENS),
        "train_seconds": round(result["seconds"], 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch thread",
        "versions": {name: version(name) for name in ("torch", "transformers", "transformer-lens")},
        "history": result["history"],
        "thresholds": {"previous_token": task.PREV_THRESHOLD,
                       "induction": task.INDUCTION_THRESHOLD},
        **info,
    }
    print(json.dumps({"name": NAME, **build}, indent=1))
    if not args.dry_run:
        folder = save_bundled_transformers(result["lm"], make_tokenizer(), NAME, build, args.out)
        size = sum(p.stat().st_size for p in folder.iterdir())
        log.info("wrote %s (%d bytes)", folder, size)


if __name__ == "__main__":
    main()

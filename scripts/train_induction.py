"""Train the two bundled induction models and write them to acdc_viz/tasks/bundled/.

    python scripts/train_induction.py                       # both models
    python scripts/train_induction.py --only induction-gpt2-2l --steps 1500

Each model is a TransformerLens 4 native bridge (``TransformerBridge.boot_native``) trained
directly with torch on sequences that hold one repeated random segment at a random offset
(``BOS, prefix, A, A, suffix``; segment length 3..11, all other tokens distinct). The loss is
next-token cross-entropy on the second copy of ``A`` after its first token: the positions only
induction can predict. Because the segment length and the offset vary, no fixed positional
shortcut ("copy the token 8 back") solves the task; the model has to learn induction heads.

Reproducible: fixed seeds (model init from the config's ``seed``, data from a private
generator), one CPU thread and deterministic algorithms. Measured on the 2-core CPU this
project runs on (shared with other jobs): see ``docs/induction.md`` and each model's JSON
(``build.train_seconds``).

After training it measures every head's previous-token and induction score from
``hook_pattern`` on the task's prompts, picks the heads by threshold, derives the canonical
circuit, checks that the circuit alone does the task, and records all of it in the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acdc_viz.graph import CircuitGraph
from acdc_viz.models.adapter import from_model
from acdc_viz.tasks import induction as task
from acdc_viz.tasks.bundled import BUNDLED_DIR, save_bundled

log = logging.getLogger("train_induction")

DATA_SEED = 1
SCORE_SEED = 12345
"""Seed of the prompts the head scores are measured on (the tests re-measure them)."""
SCORE_PROMPTS = 200
SEGMENT_LENS = (3, 11)

HYPERPARAMS: dict[str, dict[str, float]] = {
    "induction-attn-only-2l": {
        "steps": 1000,
        "batch": 128,
        "lr": 3e-3,
        "weight_decay": 0.01,
        "warmup": 100,
        "mlp_start": 0,
    },
    "induction-gpt2-2l": {
        "steps": 1500,
        "batch": 128,
        "lr": 3e-3,
        "weight_decay": 0.01,
        "warmup": 100,
        "mlp_start": 600,
    },
}


def training_batch(
    batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (batch, n_ctx), targets and a loss mask for ``BOS, prefix, A, A, suffix``."""
    n = task.N_CTX + 1
    seg = torch.randint(SEGMENT_LENS[0], SEGMENT_LENS[1] + 1, (batch, 1), generator=generator)
    room = n - 1 - 2 * seg                                    # prefix + suffix lengths
    prefix = (torch.rand(batch, 1, generator=generator) * (room + 1)).long()
    distinct = torch.rand(batch, task.D_VOCAB - 1, generator=generator).argsort(-1)[:, : n - 1] + 1
    tokens = torch.cat([torch.full((batch, 1), task.BOS), distinct], dim=1)
    pos = torch.arange(n)[None, :]
    start2 = 1 + prefix + seg                                 # first position of the second copy
    second = (pos >= start2) & (pos < start2 + seg)
    seq = tokens.gather(1, torch.where(second, pos - seg, pos))
    predictable = second & (pos > start2)  # target positions only induction predicts
    return seq[:, :-1], seq[:, 1:], predictable[:, 1:]


def induction_accuracy(model: torch.nn.Module, pairs) -> float:
    positions = list(task.repeated_positions(pairs.seq_len))
    with torch.no_grad():
        logits = model(pairs.clean)[:, positions]
    targets = pairs.clean[:, [p - pairs.seq_len // 2 + 1 for p in positions]]
    return float((logits.argmax(-1) == targets).float().mean())


def train(name: str, overrides: dict[str, float]) -> dict:
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    hp = {**HYPERPARAMS[name], **overrides}
    config = dict(task.MODEL_CONFIGS[name])
    if "init_seed" in overrides:
        config["seed"] = int(overrides.pop("init_seed"))
    torch.manual_seed(config["seed"])
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**config))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"], betas=(0.9, 0.98))
    total = int(hp["steps"])

    def lr_at(step: int) -> float:
        if step < hp["warmup"]:
            return (step + 1) / hp["warmup"]
        return 0.5 * (1 + math.cos(math.pi * (step - hp["warmup"]) / (total - hp["warmup"])))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    mlp_params = [] if config["attn_only"] else [
        p for layer in range(config["n_layers"]) for p in model.blocks[layer].mlp.parameters()
    ]
    if hp["mlp_start"]:
        with torch.no_grad():  # the MLPs add nothing until mlp_start
            for layer in range(config["n_layers"]):
                model.blocks[layer].mlp.out.weight.zero_()
                model.blocks[layer].mlp.out.bias.zero_()
    generator = torch.Generator().manual_seed(DATA_SEED)
    eval_pairs = task.make_pairs(200, seed=SCORE_SEED + 1)
    start = time.perf_counter()
    history = []
    for step in range(total):
        inputs, targets, mask = training_batch(int(hp["batch"]), generator)
        opt.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = F.cross_entropy(logits[mask], targets[mask])
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            if missing:
                raise RuntimeError(f"no gradient reaches {missing}")
        if step < hp["mlp_start"]:
            for p in mlp_params:
                p.grad = None  # AdamW skips them: frozen at zero output
        opt.step()
        sched.step()
        if step % 250 == 0 or step == total - 1:
            model.eval()
            acc = induction_accuracy(model, eval_pairs)
            model.train()
            history.append(
                {"step": step, "loss": round(loss.item(), 4), "induction_accuracy": round(acc, 4)}
            )
            log.info(
                "%s step %d loss %.4f induction accuracy %.3f (%.0f s)",
                name,
                step,
                loss.item(),
                acc,
                time.perf_counter() - start,
            )
    seconds = time.perf_counter() - start
    model.eval()
    return {"model": model, "config": config, "hp": hp, "seconds": seconds, "history": history}


def analyse(name: str, model) -> dict:
    """Head scores, the heads, the canonical circuit and how well it does the task alone."""
    scores = task.head_scores(model, task.make_pairs(SCORE_PROMPTS, seed=SCORE_SEED).clean)
    heads = task.identify_heads(scores)
    pairs = task.make_pairs(task.DEFAULT_PROMPTS, seed=0)
    weights = from_model(model, pairs.clean[:4])
    canonical = task.circuit_edges(heads, False, pairs.seq_len)
    check = {}
    for metric_fn in (task.nll_metric, task.kl_metric):
        metric = metric_fn(pairs)
        check[metric.name] = {
            "full_model": task.circuit_metric(weights, pairs, None, metric),
            "canonical_circuit": task.circuit_metric(weights, pairs, canonical, metric),
            "empty_circuit": task.circuit_metric(weights, pairs, set(), metric),
        }
        if not weights.attn_only:                               # do the MLPs add anything?
            graph = CircuitGraph(weights.n_layers, weights.n_heads)
            mlp_edges = {e.name for e in graph.edges if "mlp" in (e.src.kind, e.dest.kind)}
            check[metric.name]["canonical_plus_mlp_edges"] = task.circuit_metric(
                weights, pairs, canonical | mlp_edges, metric)
    return {
        "scores": {k: [[round(s, 4) for s in row] for row in v] for k, v in scores.items()},
        "heads": heads,
        "canonical": sorted(canonical),
        "check": {m: {k: round(v, 4) for k, v in d.items()} for m, d in check.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(task.MODEL_CONFIGS), action="append",
                        help="train only this model (repeatable)")
    for key, kind in (("steps", int), ("batch", int), ("lr", float), ("weight_decay", float),
                      ("mlp_start", int), ("init_seed", int)):
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, default=None,
                            help=f"override the {key} of HYPERPARAMS")
    parser.add_argument("--out", type=Path, default=BUNDLED_DIR, help="where to write the files")
    parser.add_argument("--dry-run", action="store_true", help="train and analyse, write nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    for name in args.only or sorted(task.MODEL_CONFIGS):
        overrides = {
            k: v
            for k in ("steps", "batch", "lr", "weight_decay", "mlp_start", "init_seed")
            if (v := getattr(args, k)) is not None
        }
        result = train(name, overrides)
        info = analyse(name, result["model"])
        build = {
            "script": "scripts/train_induction.py",
            "seeds": {"init": result["config"]["seed"], "data": DATA_SEED, "scores": SCORE_SEED},
            "score_prompts": SCORE_PROMPTS,
            "hyperparameters": result["hp"],
            "segment_lengths": list(SEGMENT_LENS),
            "train_seconds": round(result["seconds"], 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch thread",
            "versions": {
                "torch": torch.__version__,
                "transformer_lens": version("transformer-lens"),
            },
            "history": result["history"],
            "head_scores": info["scores"],
            "thresholds": {
                "previous_token": task.PREV_THRESHOLD,
                "induction": task.INDUCTION_THRESHOLD,
            },
            "heads": info["heads"],
            "canonical_edges": info["canonical"],
            "circuit_check": info["check"],
        }
        print(json.dumps({"name": name, **build}, indent=1))
        if not args.dry_run:
            path = save_bundled(result["model"], name, result["config"], build, directory=args.out)
            log.info("wrote %s (%d bytes)", path, path.stat().st_size)


if __name__ == "__main__":
    main()

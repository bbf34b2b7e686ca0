"""Rebuild the gallery (docs/gallery.md): ACDC on the bundled tasks and random GPT-2s, as PNGs.

    python docs/gallery/make_gallery.py [--traces DIR] [--positions-run]

Traces are cached in ``--traces`` (default: ``~/.cache/acdc_viz/gallery``); delete a file
there to re-run it. Timings on a 2-core CPU: the bundled tasks take
seconds each, the 4-layer, 8-head random GPT-2 about 3 minutes, and its position-split run
(``--positions-run``, 12,152 edges) about half an hour. PNG export needs kaleido and Chromium
(``BROWSER_PATH``, see ``acdc_viz.export``).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
log = logging.getLogger("make_gallery")
PROMPT = [" When", " Mary", " and", " John", " went", " to", " the", " store"]


def gpt2(n_layer: int, n_head: int, n_embd: int, vocab: int):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                    vocab_size=vocab, n_positions=64))
    hf.eval()
    directory = tempfile.mkdtemp()
    hf.save_pretrained(directory)
    return TransformerBridge.boot_transformers(directory, hf_model=hf, device="cpu")


def pairs(vocab: int, batch: int, seq: int):
    from acdc_viz.data import TokenPairs

    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (batch, seq), generator=g)
    corrupt = torch.randint(0, vocab, (batch, seq), generator=g)
    return TokenPairs(clean, corrupt)


RUNS = {  # file: (model builder, vocab, batch, seq, tau, positions, name)
    "gpt2-4l8h.json": (lambda: gpt2(4, 8, 256, 1000), 1000, 8, 8, 1e-4, False,
                       "random GPT-2 (4 layers, 8 heads)"),
    "gpt2-4l8h-positions.json": (lambda: gpt2(4, 8, 256, 1000), 1000, 8, 8, 1e-5, True,
                                 "random GPT-2 (4 layers, 8 heads)"),
}

TASK_RUNS = {  # file: `acdc-viz run` arguments (the bundled tasks, with their default settings)
    "induction-positions.json": ["--task", "induction", "--positions"],
    "induction-gpt2.json": ["--task", "induction-gpt2"],
    "tracr-reverse.json": ["--task", "tracr-reverse"],
}


def task_trace_for(name: str, directory: Path):
    from acdc_viz.cli import main as cli
    from acdc_viz.trace import load_trace

    path = directory / name
    if not path.exists():
        log.info("running acdc-viz run %s", " ".join(TASK_RUNS[name]))
        cli(["run", *TASK_RUNS[name], "--out", str(path), "--quiet"])
    return load_trace(path)


def trace_for(name: str, directory: Path):
    from acdc_viz.acdc import Acdc
    from acdc_viz.trace import load_trace, save_trace

    path = directory / name
    if path.exists():
        return load_trace(path)
    build, vocab, batch, seq, tau, positions, model_name = RUNS[name]
    log.info("running ACDC for %s", name)
    trace = Acdc(build(), pairs(vocab, batch, seq), tau=tau, positions=positions,
                 model_name=model_name, tokens=PROMPT[:seq]).run()
    save_trace(trace, path)
    return trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=Path,
                        default=Path.home() / ".cache" / "acdc_viz" / "gallery")
    parser.add_argument("--positions-run", action="store_true",
                        help="also run the 4-layer, 8-head GPT-2 split by position (slow)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    for noisy in ("kaleido", "choreographer", "logistro"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args.traces.mkdir(parents=True, exist_ok=True)

    from acdc_viz.export import export_figure
    from acdc_viz.figure import build_figure

    def png(trace, out: str, step, **kw) -> None:
        export_figure(build_figure(trace, step, **kw), HERE / out, scale=1)
        log.info("wrote %s", out)

    induction = task_trace_for("induction-positions.json", args.traces)
    png(induction, "induction-positions-end.png", None)
    induction_gpt2 = task_trace_for("induction-gpt2.json", args.traces)
    png(induction_gpt2, "induction-gpt2-end.png", None)
    png(induction_gpt2, "induction-gpt2-paths-A1.1.png", None, highlight="A1.1",
        show_removed=False)
    png(task_trace_for("tracr-reverse.json", args.traces), "tracr-reverse-end.png", None)

    big = trace_for("gpt2-4l8h.json", args.traces)
    mid = len(big.steps) // 2
    png(big, "gpt2-4l8h-start.png", -1)
    png(big, "gpt2-4l8h-middle.png", mid)
    png(big, "gpt2-4l8h-end.png", None)
    png(big, "gpt2-4l8h-kamada-kawai.png", mid, layout="kamada_kawai")
    if args.positions_run or (args.traces / "gpt2-4l8h-positions.json").exists():
        pos = trace_for("gpt2-4l8h-positions.json", args.traces)
        png(pos, "gpt2-4l8h-positions-end.png", None)

if __name__ == "__main__":
    main()

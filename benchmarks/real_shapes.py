"""`vramplan fit` then `vramplan train`, end to end, on a dataset whose rows are all different lengths.

The trainer benchmark feeds fixed-shape batches, so every step replays one CUDA graph. A real
dataset's packed rows differ in length: the recipe pads micro-batch widths to a few buckets so
that shapes repeat. This checks that they do, through the CLI a user runs: a random-weight model
from a profile (no download), a word-level tokenizer, and JSONL ``{"text"}`` rows of 20 to 1,800
words. Prints one JSON line: the run's notes (the graph summary among them), median tokens/s over
the second half of the steps, peak memory, and the loss at the start and the end.

    python -m benchmarks.real_shapes --model llama-3.2-1b --steps 60
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS = 2000


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(WORDS)])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                            unk_token="<unk>").save_pretrained(folder)


def write_dataset(path: Path, rows: int, seed: int = 0) -> None:
    """Rows with a learnable pattern (each word follows from the last), of lengths spread from 20 to 1,800 words."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(rows):
            start, step = rng.randrange(WORDS), rng.choice((1, 3, 7))
            text = " ".join(f"w{(start + step * i) % WORDS}" for i in range(rng.randint(20, 1800)))
            handle.write(json.dumps({"text": text}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--gpu", default="auto", help="the GPU `fit` plans for (a smaller catalog GPU: its plan must fit in its memory)")
    args = parser.parse_args()
    from benchmarks.trainer import build_random_model

    work = Path(tempfile.mkdtemp(dir="/tmp"))
    build_random_model(args.model, str(work / "model"))
    write_tokenizer(work / "model")
    write_dataset(work / "train.jsonl", rows=4 * args.steps)
    cli = [sys.executable, "-m", "vramplan"]
    subprocess.run(cli + ["fit", args.model, "--gpu", args.gpu, "--seq", str(args.seq), "--out", str(work / "plan.json")],
                   check=True, stdout=subprocess.DEVNULL)
    run = subprocess.run(cli + ["train", str(work / "plan.json"), "--model", str(work / "model"), "--data",
                                str(work / "train.jsonl"), "--output", str(work / "run"), "--steps", str(args.steps),
                                "--json"], capture_output=True, text=True)
    result = json.loads(run.stdout[run.stdout.rindex("\n{") + 1:] if "\n{" in run.stdout else run.stdout) \
        if run.returncode == 0 else {"error": run.stderr[-600:]}
    records = [json.loads(line) for line in open(work / "run" / "metrics.jsonl")] if run.returncode == 0 else []
    late = records[len(records) // 2:]
    print(json.dumps({
        "model": args.model, "gpu": args.gpu, "seq": args.seq, "steps": args.steps, "plan": json.loads((work / "plan.json").read_text()),
        "notes": result.get("notes"), "error": result.get("error"),
        "median_tokens_per_s_second_half": statistics.median(r["tokens_per_s"] for r in late) if late else None,
        "peak_process_bytes": max((r.get("process_memory") or 0 for r in records), default=None),
        "peak_reserved": max((r.get("peak_reserved") or 0 for r in records), default=None),
        "loss_first": records[0]["loss"] if records else None, "loss_last": records[-1]["loss"] if records else None,
    }), flush=True)


if __name__ == "__main__":
    main()

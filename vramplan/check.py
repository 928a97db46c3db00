"""Pre-flight: will THIS dataset's worst micro-batch fit, and how long will the run take?

The plan prices ``micro_batch × seq_len`` tokens, but a run only ever sees the batches its data
makes. vramplan's trainer packs examples into rows of at most ``seq_len`` tokens and pads each
micro-batch to its longest row, so the worst micro-batch is the ``micro_batch`` longest rows
(with enough data, full rows: the plan's own shape). The hf recipe does not pack: each
micro-batch is padded to its longest example, so the worst is the longest examples (cut at
``seq_len``). That worst shape is priced against the GPU; when it does not fit, the nearest plan
that does (same sequence length and effective batch where possible) is searched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vramplan.catalog import GpuSpec, ModelProfile
from vramplan.errors import VramplanError
from vramplan.estimate import Estimate, architecture, estimate_plan
from vramplan.plan import Plan

#: Placeholder share of the GPU's dense bf16 rate a LoRA step reaches (the H100 trainer runs
#: measured 5-13k tok/s on 1-5B models: 0.2-0.35 of peak). vramplan.throughput replaces it.


@dataclass
class WorstBatch:
    """The largest micro-batch the run will see: ``rows`` sequences padded to ``width`` tokens."""

    rows: int
    width: int
    packed: bool
    n_examples: int
    n_micro_batches: int
    total_tokens: int
    n_truncated: int
    n_dropped: int
    batch_rows: list  # list[list[Example]]: the rows of the worst micro-batch, for a dry run
    pad_token_id: int

    def describe(self, seq_len: int) -> str:
        if self.packed:
            how = (f"packed into rows of at most {seq_len} tokens (each micro-batch padded to its longest row): "
                   f"the worst micro-batch is {self.rows} row(s) of {self.width} tokens")
            if self.width == seq_len:
                how += ", full rows, the plan's own shape"
        else:
            how = (f"not packed (each micro-batch padded to its longest example): the worst micro-batch is "
                   f"{self.rows} example(s) of {self.width} tokens")
        extra = []
        if self.n_truncated:
            extra.append(f"{self.n_truncated} example(s) truncated to {seq_len}")
        if self.n_dropped:
            extra.append(f"{self.n_dropped} dropped")
        return how + (f" ({', '.join(extra)})" if extra else "")


def load_tokenizer(model_dir: str):
    """The plan's tokenizer, from the model folder."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise VramplanError(f"cannot load a tokenizer from {model_dir} ({str(err).splitlines()[0][:120]}); "
                            "point --model at the model folder with its tokenizer files") from None


def worst_micro_batch(records: list[dict], tokenizer, plan: Plan, overlong: str = "truncate",
                      data_path: str | None = None, row_budget: int | None = None) -> WorstBatch:
    """The largest micro-batch ``plan``'s stack will build from ``records``, tokenized as training will.

    With images or audio, ``tokenizer`` is the model's ``mm_data.MMProcessor``: every image and clip
    is opened and its real soft tokens counted (rows are then single examples of at most ``row_budget``).
    """
    from vramplan.train import data

    if plan.multimodal:
        from vramplan.train import mm_data

        dataset = mm_data.build_dataset(data_path or "the dataset", tokenizer, row_budget or plan.seq_len, overlong,
                                        records=records)
        rows, pad = dataset.rows, dataset.pad_token_id
        truncated, dropped, n_examples = dataset.n_truncated, dataset.n_dropped, dataset.n_examples
    elif plan.stack == "vramplan":
        dataset = data.build_dataset("the dataset", tokenizer, plan.seq_len, overlong, records=records)
        rows, pad = dataset.rows, dataset.pad_token_id
        truncated, dropped, n_examples = dataset.n_truncated, dataset.n_dropped, dataset.n_examples
    else:
        examples, truncated, dropped = [], 0, 0
        for record in records:
            ids, train = data.tokenize(record, tokenizer)
            if len(ids) > plan.seq_len:
                if overlong == "drop":
                    dropped += 1
                    continue
                ids, train = ids[:plan.seq_len], train[:plan.seq_len]
                truncated += 1
            examples.append(data.to_example(ids, train))
        if not examples:
            raise VramplanError(f"no example is left at --seq {plan.seq_len}; raise the plan's seq_len or use --overlong truncate")
        rows, n_examples = [[e] for e in examples], len(examples)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    widths = [data.row_length(row) for row in rows]
    longest = sorted(range(len(rows)), key=lambda i: -widths[i])[:plan.micro_batch]
    return WorstBatch(rows=len(longest), width=widths[longest[0]], packed=plan.stack == "vramplan",
                      n_examples=n_examples, n_micro_batches=-(-len(rows) // plan.micro_batch),
                      total_tokens=sum(widths), n_truncated=truncated, n_dropped=dropped,
                      batch_rows=[rows[i] for i in longest], pad_token_id=pad)


def worst_batch_tensors(worst: WorstBatch, stack: str) -> dict:
    """The worst micro-batch as the stack's step takes it (host tensors)."""
    from vramplan.train.data import IGNORE, collate, row_length

    batch = collate(worst.batch_rows, worst.pad_token_id)
    if stack == "vramplan":
        return batch
    # the hf model shifts labels itself and needs an attention mask over the padding
    lengths = [row_length(row) for row in worst.batch_rows]
    mask = batch["input_ids"].new_zeros(batch["input_ids"].shape)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    labels = batch["input_ids"].masked_fill(mask == 0, IGNORE)
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "labels": labels}


def predicted_tokens_per_s(profile: ModelProfile, plan: Plan, gpu: GpuSpec | None,
                           host_us: float | None = None) -> float | None:
    """Training tokens per second from the throughput model (vramplan.throughput) on a host whose probe read
    ``host_us`` (None: the reference host); None when the GPU's speed is unknown (a bare budget such as 12GB, or a
    GPU the catalog lacks)."""
    from vramplan.throughput import LINK_BYTES_PER_S, predict_tokens_per_s

    if gpu is None or not (gpu.bf16_tflops or gpu.fp16_tflops) or not gpu.bandwidth_gbs:
        return None
    if plan.gpus > 1 and gpu.interconnect not in LINK_BYTES_PER_S:
        return None  # the box's link is unknown: its communication time cannot be predicted
    return predict_tokens_per_s(architecture(profile), plan, gpu, host_us=host_us)


def probe_for(gpu: GpuSpec | None):
    """The host probe ``vramplan calibrate`` stored on this machine, where it drove this GPU model (a check usually
    runs where the job will); None otherwise."""
    from vramplan.host import stored_probe

    probe = stored_probe()
    return probe if probe is not None and gpu is not None and probe.gpu == gpu.name else None


@dataclass
class CheckResult:
    plan: Plan
    worst: WorstBatch
    estimate: Estimate  # at the worst micro-batch's shape
    budget_bytes: int
    tokens_per_s: float | None
    seconds_to_finish: float | None
    nearest: Any = None  # FitResult when it does not fit and something does
    nearest_error: str | None = None
    dry_run: Any = None  # calibrate.MeasuredRun with --dry-run
    host: Any = None  # host.HostProbe the speed was predicted for; None: the reference host

    @property
    def fits(self) -> bool:
        if self.dry_run is not None and not self.dry_run.fitted:
            return False
        return self.estimate.peak_bytes <= self.budget_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.estimate.peak_bytes

    @property
    def headroom_percent(self) -> float:
        return 100 * self.headroom_bytes / self.budget_bytes

    @property
    def exit_code(self) -> int:
        return 0 if self.fits else 1

    def to_dict(self) -> dict[str, Any]:
        w = self.worst
        return {
            "fits": self.fits, "headroom_bytes": self.headroom_bytes, "headroom_percent": self.headroom_percent,
            "budget_bytes": self.budget_bytes, "peak_bytes": self.estimate.peak_bytes, "gpu": self.estimate.gpu,
            "worst_batch": {"rows": w.rows, "width": w.width, "packed": w.packed, "examples": w.n_examples,
                            "micro_batches": w.n_micro_batches, "tokens": w.total_tokens,
                            "truncated": w.n_truncated, "dropped": w.n_dropped},
            "tokens_per_s": self.tokens_per_s, "seconds_to_finish": self.seconds_to_finish,
            "plan": self.plan.to_dict(), "estimate": self.estimate.to_dict(),
            "nearest_plan": self.nearest.plan.to_dict() if self.nearest else None, "nearest_error": self.nearest_error,
            "dry_run": self.dry_run.to_record() if self.dry_run is not None else None,
            "host_probe_us": self.host.autograd_op_us if self.host is not None else None,
        }


def check_plan(plan: Plan, profile: ModelProfile, records: list[dict], tokenizer, gpu: GpuSpec | None, budget: int,
               epochs: float = 1.0, overlong: str = "truncate", adjust=None, data_path: str | None = None) -> CheckResult:
    """Price the dataset's worst micro-batch under ``plan`` against ``budget``; find the nearest fitting plan if not."""
    from vramplan.fit import fit_plan

    adjust = adjust or (lambda est: est)
    if plan.multimodal:  # the rows hold the examples' real soft tokens; the plan adds its own per example
        from vramplan.memory.towers import decoder_seq_len

        arch = architecture(profile)
        worst = worst_micro_batch(records, tokenizer, plan, overlong, data_path, decoder_seq_len(arch, plan))
        from vramplan.train.mm_data import media_token_count

        # priced as the worst example really is: its text tokens, its own images, its audio (if any)
        example = worst.batch_rows[0][0]
        shaped = plan.replace(seq_len=max(1, worst.width - media_token_count(example, tokenizer)), micro_batch=worst.rows,
                              images_per_example=len(example.images),
                              audio_seconds_per_example=plan.audio_seconds_per_example if example.audio else 0.0)
    else:
        worst = worst_micro_batch(records, tokenizer, plan, overlong)
        shaped = plan.replace(seq_len=worst.width, micro_batch=worst.rows)
    est = adjust(estimate_plan(shaped, profile, gpu, budget=budget))
    host = probe_for(gpu)
    rate = predicted_tokens_per_s(profile, plan, gpu, host.autograd_op_us if host is not None else None)
    seconds = worst.total_tokens * epochs / rate if rate else None
    result = CheckResult(plan=plan, worst=worst, estimate=est, budget_bytes=budget, tokens_per_s=rate,
                         seconds_to_finish=seconds, host=host)
    if not result.fits:
        try:
            result.nearest = fit_plan(profile, gpu, budget=budget, base=plan, adjust=adjust)
        except VramplanError as err:
            result.nearest_error = str(err)
    return result

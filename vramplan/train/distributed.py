"""Training on several GPUs with PyTorch's own ``torch.distributed``, started by ``torchrun``.

Two ways, as the plan's ``parallel`` says:

* ``ddp``: every rank holds the whole quantized model; ``DistributedDataParallel`` all-reduces the
  LoRA gradients (the only ones there are) once per optimizer step.
* ``fsdp``: FSDP2 (``fully_shard``) shards each decoder layer, the frozen NF4 bytes included, so a
  model whose 4-bit weights do not fit one GPU trains on several. The NF4 state of a linear is a
  plain dataclass, which FSDP cannot see; ``ShardableQLoRALinear`` keeps the same bytes as frozen
  parameters instead and rebuilds the ``NF4Tensor`` view from the (all-gathered) parameters on
  every call.

Ctrl-C or SIGTERM: every rank stops at the same step boundary, with a checkpoint (``stopping.py``).

Every rank reads the same data order and takes its own contiguous slice of each global
micro-batch (``recipe.next_micro_batches``); the loss is divided by the target tokens of the
whole global batch (one all-reduce on the device), so N ranks with micro-batch m compute the
gradient of one rank with micro-batch N·m. Rank 0 alone writes files.

A failing rank writes its one-line message into the run's error folder before it exits; the
other ranks, whose collectives then fail, see the message and leave quietly, and the launcher
that ``vramplan train`` started prints that one line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vramplan.errors import VramplanError
from vramplan.signals import handling
from vramplan.train.ops import NF4Tensor, QLoRALinear

ERROR_DIR_ENV = "VRAMPLAN_ERROR_DIR"


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank, local rank (its GPU), how many ranks, how they train."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    parallel: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def sharded(self) -> bool:
        """FSDP2, on several GPUs or on one (its CPU offload of a model too big for the GPU)."""
        return self.parallel == "fsdp"


def layout(plan, gpus: int | None, parallel: str | None) -> dict:
    """``gpus`` and ``parallel`` (plan fields) after ``--gpus`` / ``--parallel``: one GPU means no
    parallel mode; several without one named keep the plan's, or DDP (CPU offload stays FSDP's)."""
    gpus = plan.gpus if gpus is None else gpus
    if gpus < 2:  # one GPU may still run FSDP2, for its CPU offload of a model too big for the GPU
        keep = (parallel or plan.parallel) == "fsdp"
        return {"gpus": 1, "parallel": "fsdp" if keep else "none", "cpu_offload": keep and plan.cpu_offload}
    parallel = parallel or (plan.parallel if plan.parallel != "none" else "ddp")
    return {"gpus": gpus, "parallel": parallel, "cpu_offload": plan.cpu_offload and parallel == "fsdp"}


def under_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets these for every worker it starts."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def start(parallel: str, device: str | None) -> tuple[World, torch.device]:
    """Join the process group when torchrun started this process; the launch's world size wins over the plan's.

    nccl on CUDA (each rank on cuda:LOCAL_RANK), gloo on the CPU. Outside torchrun: one rank, no group.
    """
    one_rank_sharded = parallel == "fsdp" and under_torchrun()  # FSDP2 on one GPU: CPU offload of a model too big for it
    if not under_torchrun() or (int(os.environ["WORLD_SIZE"]) < 2 and not one_rank_sharded):
        return World(), torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local_rank, size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                device_id=torch.device("cuda", local_rank) if use_cuda else None)
    parallel = parallel if parallel != "none" else "ddp"
    return World(rank, local_rank, size, parallel), torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The launcher: `vramplan train` with a plan for N GPUs starts torchrun itself
# --------------------------------------------------------------------------------------------


def launch(gpus: int, argv: list[str]) -> int:
    """Run ``torchrun --nproc-per-node gpus -m vramplan <argv>``; return the exit code to leave with.

    The ranks' output is passed through as it comes (rank 0's progress bar included) until a rank
    reports a failure; from then on the dying ranks' and torchrun's own reports are dropped, and
    the failing rank's one line is printed instead.
    """
    errors = Path(tempfile.mkdtemp(prefix="vramplan-ranks-"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
               "-m", "vramplan", *argv]
    env = dict(os.environ, **{ERROR_DIR_ENV: str(errors)})
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // gpus)))  # torchrun would set 1, with a banner
    # after a stop signal torchrun waits this long (its default: 30 s) before it kills the ranks: time to finish the
    # step under way and write the checkpoint
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    # its own session: the terminal's Ctrl-C reaches this process alone, which passes each signal on once
    # (torchrun passes it on to the ranks, in sessions of their own), so a rank never sees one Ctrl-C twice
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    pumps = [threading.Thread(target=_pass_through, args=(pipe, stream, errors), daemon=True)
             for pipe, stream in ((process.stdout, sys.stdout), (process.stderr, sys.stderr))]
    for pump in pumps:
        pump.start()
    with handling(FORWARDED, lambda signum, frame: process.send_signal(signum)):
        code = process.wait()
        for pump in pumps:
            pump.join()
    failures, stopped = _failures(errors), _stopped(errors)
    shutil.rmtree(errors, ignore_errors=True)
    if failures:
        rank, message, exit_code, details = failures[0]
        print(_error_line(rank, message, exit_code, details), file=sys.stderr)
        return exit_code
    if stopped:  # rank 0's line after a stop on a signal (torchrun's own report of it is dropped)
        print(stopped[1])
        return stopped[0]
    return code


SHUTDOWN_TIMEOUT_S = 120
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _pass_through(pipe, stream, errors: Path) -> None:
    """Copy a rank pipe to our stream as it comes (progress bars redraw with \\r), until a rank failed or stopped."""
    while chunk := pipe.read1(4096):
        if not _failures(errors) and not _stopped(errors):
            stream.buffer.write(chunk)
            stream.flush()


def _failures(folder: Path) -> list[tuple[int, str, int, str]]:
    """(rank, one-line message, exit code, traceback or "") of each rank that reported a failure."""
    found = []
    for path in folder.glob("rank-*.txt"):
        head, _, details = path.read_text().partition("\n")
        code, _, message = head.partition(" ")
        found.append((int(path.stem.removeprefix("rank-")), message.strip(), int(code), details))
    return sorted(found, key=lambda f: f[0])


def _stopped(folder: Path) -> tuple[int, str] | None:
    """(exit code, rank 0's line) once the ranks stopped on a signal, with their checkpoint written."""
    path = folder / STOPPED_FILE
    if not path.is_file():
        return None
    code, _, text = path.read_text().partition("\n")
    return int(code), text


def _error_line(rank: int, message: str, code: int, details: str) -> str:
    """A user's error (a VramplanError: exit code 2, or 130 after a second Ctrl-C) needs no rank; a bug names its rank."""
    return f"{details}error: {message}" + ("" if code != 1 else f" (rank {rank})")


STOPPED_FILE = "stopped.txt"


def report_stop(code: int, text: str) -> bool:
    """Under the launcher of ``vramplan train``: hand it rank 0's line after a stop, for it to print once
    torchrun is done (whose own report of the stop is dropped). False elsewhere: print the line yourself."""
    launched = os.environ.get(ERROR_DIR_ENV)
    if not launched:
        return False
    _write_whole(Path(launched) / STOPPED_FILE, f"{code}\n{text}")
    return True


def run_rank(fn):
    """Call ``fn()`` on a rank; a failure there ends this rank with one line, not a traceback per rank.

    A VramplanError is reported with exit code 2; another exception (a bug) with its traceback; a
    rank whose collective broke because a peer had failed first leaves quietly. Under the
    launcher of ``vramplan train`` the launcher prints the report; under a bare torchrun the
    first rank to fail prints it.
    """
    launched = os.environ.get(ERROR_DIR_ENV)
    errors = Path(launched or Path(tempfile.gettempdir()) / f"vramplan-ranks-{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}"
                  f"-{os.environ.get('MASTER_PORT', '')}")
    rank = int(os.environ.get("RANK", "0"))
    try:
        return fn()
    except VramplanError as err:
        code, message, details = err.exit_code, str(err), ""
    except KeyboardInterrupt:  # a Ctrl-C outside the loop (which takes it as a request to stop: stopping.py)
        code, message, details = 130, "interrupted (Ctrl-C)", ""
    except Exception as err:  # noqa: BLE001: every failure of one rank must end the others
        code, message, details = 1, f"{type(err).__name__}: {err}".splitlines()[0], traceback.format_exc()
    if not _first_to_fail(errors):
        _leave(1)  # a peer failed first: its message is the one that matters
    _report(errors, rank, code, message, details)
    if not launched:
        print(_error_line(rank, message, code, details), file=sys.stderr, flush=True)
    _leave(code)


def _first_to_fail(errors: Path) -> bool:
    errors.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(errors / "first", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _report(errors: Path, rank: int, code: int, message: str, details: str = "") -> None:
    _write_whole(errors / f"rank-{rank}.txt", f"{code} {message}\n{details}")


def _write_whole(path: Path, text: str) -> None:
    """Written beside and renamed into place: the launcher polling the folder never reads half of it."""
    path.with_suffix(".tmp").write_text(text)
    path.with_suffix(".tmp").rename(path)


def finish(code: int = 0) -> None:
    """A rank's clean end (``code``: 0, or 130 / 143 after a stop on a signal): everything is written and
    the group is gone, so exit without the interpreter's teardown, where a communication library's
    threads can still abort the process ("terminate called without an active exception", seen under
    load with gloo)."""
    _leave(code)


def _leave(code: int) -> None:
    """Exit now: no interpreter teardown that could wait on a collective a dead peer never joins."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --------------------------------------------------------------------------------------------
# The model under DDP or FSDP2
# --------------------------------------------------------------------------------------------


class ShardableQLoRALinear(QLoRALinear):
    """A QLoRALinear whose NF4 bytes are frozen parameters, so FSDP2 can shard and all-gather them.

    Each part of the NF4 state (packed nibbles, absmax codes, their scales, offset and code book)
    becomes a ``requires_grad=False`` parameter; ``weight`` rebuilds the ``NF4Tensor`` view from
    whatever those parameters are at the moment: the local shards between steps, the gathered
    whole inside the layer's forward and backward. The kernels see the same NF4Tensor as on one GPU.
    Byte parts (the packed nibbles, the double-quantized absmax codes) are stored as bf16 views
    of the same bytes, as Answer.AI's FSDP-QLoRA stores bitsandbytes' (``quant_storage=bf16``):
    FSDP2's CPU offload makes each shard a fresh ``nn.Parameter``, which refuses an integer dtype.
    """

    _PARTS = ("packed", "absmax", "absmax_scale", "absmax_code")

    @classmethod
    def convert(cls, module: QLoRALinear) -> None:
        """Turn ``module`` into this class in place (FSDP2 itself swaps classes this way)."""
        q = module.__dict__.pop("weight")
        byte_counts = {}
        for part in cls._PARTS:
            value = getattr(q, part)
            if value is None:
                continue
            if value.dtype == torch.uint8:
                byte_counts[part] = value.numel()
                value = _as_bf16_storage(value)
            module.register_parameter(f"nf4_{part}", nn.Parameter(value, requires_grad=False))
        module._nf4_bytes = byte_counts
        if q.absmax_offset is not None:
            module.register_parameter("nf4_absmax_offset", nn.Parameter(q.offset_tensor(), requires_grad=False))
        module._nf4_layout = (q.shape, q.dtype, q.blocksize)
        module.__class__ = cls

    @property
    def weight(self) -> NF4Tensor:
        shape, dtype, blocksize = self._nf4_layout
        params = {name.removeprefix("nf4_"): value for name, value in self._parameters.items() if name.startswith("nf4_")}
        for part, count in self._nf4_bytes.items():
            params[part] = params[part].view(torch.uint8).view(-1)[:count]
        return NF4Tensor(params["packed"], params["absmax"], shape, dtype, blocksize,
                         absmax_scale=params.get("absmax_scale"), absmax_offset=params.get("absmax_offset"),
                         absmax_code=params.get("absmax_code"))

    def _apply(self, fn, recurse=True):
        """Moves reach the NF4 parts (parameters now), casts never do: ``.to(torch.float32)`` on the
        model would turn their bf16-typed bytes into other numbers."""
        parts = {name: self._parameters.pop(name) for name in list(self._parameters) if name.startswith("nf4_")}
        try:
            return nn.Module._apply(self, fn, recurse)
        finally:
            for name, param in parts.items():
                device = fn(torch.empty(0, device=param.device)).device
                self._parameters[name] = param if device == param.device else \
                    nn.Parameter(param.detach().to(device), requires_grad=False)


def _as_bf16_storage(data: torch.Tensor) -> torch.Tensor:
    """The bytes of a uint8 tensor viewed as bf16 (padded to an even count): the same memory, a float dtype."""
    flat = data.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat.view(torch.bfloat16)


def make_shardable(layer: nn.Module) -> None:
    for module in list(layer.modules()):
        if type(module) is QLoRALinear and isinstance(module.weight, NF4Tensor):
            ShardableQLoRALinear.convert(module)


class SummedLoss(nn.Module):
    """The model's training loss as a module, so DDP and FSDP2 see a forward call.

    The recipe never calls the causal LM's own forward (it would build the logits); DDP needs
    its forward to run to prepare the gradient all-reduce, FSDP2 to gather the root's
    parameters (embeddings, final norm, LM head).
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, position_ids, labels):
        from vramplan.train.loss import summed_loss

        return summed_loss(self.lm, {"input_ids": input_ids, "position_ids": position_ids, "labels": labels})


def layer_sharder(plan):
    """``after_layer`` for ``load_for_training``: FSDP2 on one decoder layer right after it was
    quantized, so its full copy is freed at once and a rank never holds more than one layer
    unsharded while the model loads. ``plan.cpu_offload``: the shards live in (pinned) host memory."""
    from torch.distributed.fsdp import fully_shard

    def shard(layer: nn.Module) -> None:
        make_shardable(layer)
        if plan.cpu_offload:
            parameters_to_host(layer)
        fully_shard(layer, **_fsdp_options(plan.cpu_offload))

    return shard


def parameters_to_host(module: nn.Module) -> None:
    """Every parameter not yet sharded into CPU memory, buffers left where they are.

    FSDP2's CPU offload takes parameters that already live on the CPU (it pins their shards and
    gathers them to the GPU per layer); the buffers (rotary tables) are not FSDP's and stay on the
    GPU, so ``module.to("cpu")`` would be wrong. A parameter shared by two modules stays shared.
    """
    from torch.distributed.tensor import DTensor

    moved: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None or isinstance(param, DTensor) or param.device.type == "cpu":
                continue
            if id(param) not in moved:
                moved[id(param)] = nn.Parameter(param.detach().to("cpu"), requires_grad=param.requires_grad)
            sub._parameters[name] = moved[id(param)]


def _fsdp_options(offload: bool) -> dict:
    if not offload:
        return {}
    from torch.distributed.fsdp import CPUOffloadPolicy

    return {"offload_policy": CPUOffloadPolicy()}


def wrap(model: nn.Module, world: World, device: torch.device, offload: bool = False) -> "Parallel | None":
    """The model ready for the loop: DDP around it, or FSDP2 at its root (its layers were sharded as they
    loaded); None for one unsharded process, whose loop calls the model itself."""
    if world.size < 2 and not world.sharded:
        return None
    loss = SummedLoss(model)
    if world.sharded:
        from torch.distributed.fsdp import fully_shard

        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        if isinstance(embedding, nn.Embedding) and (head is None or head.weight is not embedding.weight):
            # (on a GPU an untied table is in host memory already: patching.keep_input_embeddings_on_host)
            # its own unit: gathered for its forward only (no gradient flows into it), where in the root's
            # unit it would stay whole through the backward too (2.1 GB a rank for Llama-3.3-70B's table)
            if offload:
                parameters_to_host(embedding)
            fully_shard(embedding, **_fsdp_options(offload))
        if offload:
            parameters_to_host(loss)
        return Parallel(fully_shard(loss, **_fsdp_options(offload)), world)
    from torch.nn.parallel import DistributedDataParallel

    freeze_unused_adapters(model)
    ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; 2.11 knows only that name
        warnings.simplefilter("ignore", FutureWarning)
        # buffers (rotary tables) are the same on every rank: no broadcast before each forward
        ddp = DistributedDataParallel(loss, device_ids=ids, find_unused_parameters=False, broadcast_buffers=False)
    return Parallel(ddp, world)


def freeze_unused_adapters(model: nn.Module) -> None:
    """Stop DDP waiting for gradients that never come: Gemma 4's shared-KV layers read K/V from an
    earlier layer, so where a transformers version still builds their k_proj/v_proj, those adapters
    get no gradient (DDP with ``find_unused_parameters=False`` would fail at the next step). They
    stay in the optimizer, which skips a parameter without a gradient, as it does on one GPU."""
    for module in model.modules():
        if getattr(module, "is_kv_shared_layer", False):
            for name in ("k_proj", "v_proj"):
                projection = getattr(module, name, None)
                if isinstance(projection, QLoRALinear):
                    projection.lora_A.weight.requires_grad_(False)
                    projection.lora_B.weight.requires_grad_(False)


@dataclass
class Parallel:
    """What ``loss.accumulate_gradients`` needs to know of the ranks: the loss module to call,
    the world size, a device-side sum over ranks and whether this micro-batch syncs gradients."""

    module: nn.Module
    world: World

    @property
    def size(self) -> int:
        return self.world.size

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gradient_sync(self, last: bool):
        """DDP's ``no_sync`` / FSDP2's ``set_requires_gradient_sync``: only the last micro-batch of a step reduces."""
        if self.world.size < 2 or last:
            if self.world.parallel == "fsdp":
                self.module.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.world.parallel == "fsdp":
            self.module.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.module.no_sync()


# --------------------------------------------------------------------------------------------
# Whole tensors out of shards (for saving) and shards out of whole tensors (for resuming)
# --------------------------------------------------------------------------------------------


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a collective: every rank calls it), else the tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``param`` is: this rank's dim-0 slice of it, as FSDP2 cuts it,
    when param is a DTensor. Cut locally, with no collective: every rank read the same file, and the
    shards may live on the host (CPU offload) while the mesh is on the GPUs."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return value
    local = param.to_local()
    rank, size = param.device_mesh.get_local_rank(), param.device_mesh.size()
    chunks = torch.chunk(value, size, dim=0)  # FSDP2's Shard(0): torch.chunk, trailing ranks possibly empty
    mine = chunks[rank] if rank < len(chunks) else value.new_empty((0, *value.shape[1:]))
    mine = mine.to(device=local.device, dtype=local.dtype).contiguous()
    return DTensor.from_local(mine, param.device_mesh, param.placements, run_check=False, shape=value.shape,
                              stride=value.stride())


def full_optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor made whole: the same file for any rank count."""
    state = optimizer.state_dict()
    state["state"] = {index: {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                      for index, entry in state["state"].items()}
    return state


def shard_optimizer_state(state: dict, optimizer) -> dict:
    """The inverse of ``full_optimizer_state`` for this optimizer's (possibly sharded) parameters."""
    if getattr(optimizer, "cuts_its_own_shards", False):  # FusedShardedAdamW8bit: blocks depend on the shards
        return state
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = dict(state)
    out["state"] = {}
    for index, entry in state["state"].items():
        param = params[int(index)]
        out["state"][index] = {k: like(param, v) if isinstance(v, torch.Tensor) and v.shape == param.shape else v
                               for k, v in entry.items()}
    return out


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The gradients' global L2 norm as a device tensor; FSDP2's sharded ones reduced over ranks (a collective)."""
    return full(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` that also takes FSDP2's sharded gradients (their norm is reduced over ranks)."""
    norm = grad_norm(params)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm

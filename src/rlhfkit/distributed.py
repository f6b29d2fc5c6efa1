"""What a trainer needs to run as N data-parallel processes (``torchrun`` or ``accelerate launch``).

Every rank holds the same weights (DDP all-reduces the gradients; FSDP2 shards them, see
``shard_full_model``); a step's global batch is split into equal contiguous shares, rank 0 first.
The math that needs the whole batch (advantage whitening, group statistics, metrics) runs on the
gathered per-row numbers, which are small; the large tensors (ids, hidden states) stay on their rank.
Rank 0 alone writes files. With one process every helper here is the identity, so a one-process
run computes exactly what it did before data parallelism existed.

Helpers take the ``accelerate.Accelerator`` (or its ``PartialState``): its ``num_processes``,
``process_index`` and ``device`` are all they read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from rlhfkit.errors import RlhfkitError

T = TypeVar("T")


def make_accelerator(find_unused_parameters: bool = False) -> Any:
    """The accelerator of a training run: one process, or N started by ``torchrun`` or ``accelerate launch``.

    Without a GPU, accelerate joins the launcher's processes (gloo) only when told to use the CPU;
    otherwise each would silently train alone on the whole batch. ``find_unused_parameters``: some
    steps leave trainable weights without a gradient (a critic's warm-up trains the critic alone).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # an accelerate config with distributed_type DEEPSPEED (GPU machines)
        if plugin.zero_stage == 3:
            raise RlhfkitError(
                "DeepSpeed ZeRO-3 partitions the weights that the rollout reads whole: "
                "shard a full fine-tune with --full --fsdp (FSDP2) instead, or use ZeRO-2"
            )
        # The trainers form their own mini-batches; DeepSpeed only asks for a number.
        if plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RlhfkitError(
            f"the launcher started {launched} processes but accelerate joined {accelerator.num_processes}; "
            "see README 'More than one process or GPU'"
        )
    return accelerator


def rank_slice(n: int, rank: int, world: int, what: str = "--batch-size") -> slice:
    """This rank's contiguous near-equal share of ``n`` rows, rank 0's first (the first ``n % world``
    ranks take one more): for batches that need not split evenly, such as an epoch's last. Every rank
    needs a row, so that each runs the same forward passes (a clear error if not)."""
    if n < world:
        raise RlhfkitError(
            f"{what}: a batch of {n} does not split over {world} processes (each needs at least one); "
            f"use at least {world} per batch or fewer processes"
        )
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


def check_divisible(value: int, world: int, flag: str) -> None:
    if value % world:
        raise RlhfkitError(f"{flag} {value} does not split over {world} processes: use a multiple of {world}")


def gather_rows(accelerator: Any, tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, rank 0's first; per-token tensors are right-padded with 0 to the longest rank's width."""
    if accelerator.num_processes == 1:
        return tensor
    if tensor.dim() > 1:
        tensor = accelerator.pad_across_processes(tensor.contiguous(), dim=1)
    if tensor.dtype == torch.bool:  # gloo cannot all-gather bools
        return accelerator.gather(tensor.to(torch.uint8)).bool()
    return accelerator.gather(tensor.contiguous())


def local_rows(accelerator: Any, tensor: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """This rank's rows of a gathered tensor (the inverse of ``gather_rows``), cut to ``width`` columns."""
    if accelerator.num_processes > 1:
        n = tensor.shape[0] // accelerator.num_processes
        tensor = tensor[accelerator.process_index * n : (accelerator.process_index + 1) * n]
    if width is not None and tensor.dim() > 1:
        tensor = tensor[:, :width]
    return tensor


def gather_objects(accelerator: Any, items: list[Any]) -> list[Any]:
    """Every rank's list, concatenated in rank order (texts, prompts)."""
    if accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def sum_over_ranks(accelerator: Any, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of a float tensor (every rank gets it)."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(values.to(accelerator.device, torch.float64), reduction="sum")


def from_main(accelerator: Any, obj: T) -> T:
    """Rank 0's ``obj`` on every rank (a decision or a result computed on rank 0 alone)."""
    if accelerator.num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def global_loss_scale(accelerator: Any, weight: float, finite: bool = True) -> tuple[float, bool]:
    """``(scale, every rank's loss finite)``: the factor that makes DDP's mean of per-rank losses equal
    the loss over the global mini-batch.

    Each rank's loss is a mean over its own ``weight`` (tokens or rows); the global one weighs the
    ranks by their share of the total, and DDP divides the summed gradients by the world size. The
    finiteness is global so that every rank stops together (one rank raising alone would leave the
    others waiting in the next all-reduce).
    """
    world = accelerator.num_processes
    if world == 1:
        return 1.0, finite
    flags = torch.tensor([weight, float(not finite)], dtype=torch.float64, device=accelerator.device)
    summed = sum_over_ranks(accelerator, flags).cpu()
    total, bad = float(summed[0]), float(summed[1])
    return (world * weight / total if total > 0 else 0.0), bad == 0


def mean_over_ranks(accelerator: Any, stats: dict[str, float], weight: float) -> dict[str, float]:
    """``weight``-weighted mean of each statistic over the ranks (one all-reduce for all of them)."""
    if accelerator.num_processes == 1:
        return stats
    keys = list(stats)
    packed = torch.tensor([stats[k] * weight for k in keys] + [weight], dtype=torch.float64, device=accelerator.device)
    summed = sum_over_ranks(accelerator, packed).cpu()
    total = float(summed[-1])
    return {k: (float(summed[i]) / total if total > 0 else 0.0) for i, k in enumerate(keys)}


def rank_seed(seed: int, accelerator: Any) -> int:
    """Rank r samples with its own stream (equal streams would sample equal completions on every rank)."""
    return seed + 1_000_003 * accelerator.process_index


def all_rng_states(accelerator: Any, own: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's random state, gathered to rank 0 (``None`` on the others)."""
    if accelerator.num_processes == 1:
        return [own]
    from accelerate.utils import gather_object

    states = gather_object([own])
    return states if accelerator.is_main_process else None


# ----------------------------------------------------------------------------------------------
# FSDP2: full fine-tuning of a model too large for one process


def shard(root: torch.nn.Module, trunks: Sequence[torch.nn.Module], accelerator: Any) -> None:
    """FSDP2 (``fully_shard``) over every rank: each decoder layer of each trunk is one group, and
    what is left in ``root`` (embeddings, final norm, LM head, value head) the root group. Each rank
    then keeps 1/N of every weight, gradient and optimizer state; a group's weights are all-gathered
    just for its forward and backward. Called directly, not through accelerate's FSDP plugin, which
    does not shard on the CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rlhfkit.models import decoder_of

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for trunk in {id(t): t for t in trunks}.values():
        for layer in decoder_of(trunk).layers:
            fully_shard(layer, mesh=mesh)
        # transformers' generate then keeps every rank stepping until all are done (synced_gpus):
        # a rank that stopped early would leave the others waiting in a layer's all-gather.
        trunk._is_fsdp_managed_module = True
        if hasattr(trunk, "get_base_model"):  # peft: generate runs on the model inside
            trunk.get_base_model()._is_fsdp_managed_module = True
    fully_shard(root, mesh=mesh)
    # FSDP sets up its groups at the root's first forward; the first pass here is a rollout that runs
    # the layers without the root's forward, and a layer would then take itself for a root.
    root._get_fsdp_state()._lazy_init()  # type: ignore[operator]


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextmanager
def root_gathered(root: torch.nn.Module) -> Iterator[None]:
    """The root group's weights whole while inside: the rollout calls the roles' methods (sampling,
    log-probs, values), not their ``forward``, so FSDP's own hooks would not gather them. The layers
    still gather themselves, so every rank must run as many forward passes (``synced_gpus``)."""
    if not is_sharded(root):
        yield
        return
    root.unshard()  # type: ignore[operator]
    try:
        yield
    finally:
        root.reshard()  # type: ignore[operator]


def full_state(root: torch.nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The whole tensors of the entries ``names`` of ``root``'s state dict (default all; every rank
    must call; rank 0 gets them, the others an empty dict). Unsharded: the tensors themselves."""
    if not is_sharded(root):
        state = root.state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().contiguous() for k, v in state.items() if names is None or k in names}


def load_full_state(root: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Whole tensors (every rank read them) into the parameters, sharded or not."""
    if not is_sharded(root):
        device = next(root.parameters()).device
        root.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(root, state, options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state whole (rank 0's copy is complete); every rank must call."""
    if not is_sharded(root):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(root, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if not is_sharded(root):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))

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
from collections.abc import Sequence
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
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RlhfkitError(
            f"the launcher started {launched} processes but accelerate joined {accelerator.num_processes}; "
            "see README 'More than one process or GPU'"
        )
    return accelerator


def rank_share(items: Sequence[T], rank: int, world: int, what: str = "--batch-size") -> list[T]:
    """This rank's contiguous share of a global batch; the batch must split evenly (a clear error if not)."""
    if len(items) % world:
        raise RlhfkitError(f"{what} {len(items)} does not split over {world} processes: use a multiple of {world}")
    size = len(items) // world
    return list(items[rank * size : (rank + 1) * size])


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
    summed = sum_over_ranks(accelerator, torch.tensor([weight, float(not finite)], dtype=torch.float64)).cpu()
    total, bad = float(summed[0]), float(summed[1])
    return (world * weight / total if total > 0 else 0.0), bad == 0


def mean_over_ranks(accelerator: Any, stats: dict[str, float], weight: float) -> dict[str, float]:
    """``weight``-weighted mean of each statistic over the ranks (one all-reduce for all of them)."""
    if accelerator.num_processes == 1:
        return stats
    keys = list(stats)
    packed = torch.tensor([stats[k] * weight for k in keys] + [weight], dtype=torch.float64)
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

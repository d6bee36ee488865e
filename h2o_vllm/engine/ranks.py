"""One decision per block across parallel ranks: reduce each step's scores before the scheduler sees them.

With tensor parallelism every rank runs the same step (the same ``SchedulerOutput``,
the same block tables, the same holes) over its own query heads; with pipeline
parallelism over its own layers. A rank's scores are therefore a part of the
request's, and vLLM hands the scheduler one rank's output only (TP rank 0 of the
last stage). Each worker calls :meth:`RankReducer.attention` and
:meth:`RankReducer.key_norms` in the same order in ``sample_tokens``, which vLLM
broadcasts to every rank, so the collectives line up:

- attention mass of ``score_reduce="sum"`` requests: summed over ranks;
- ``score_reduce="max"``: each query row's largest block mass over heads and layers,
  maxed over ranks *before* the rows are summed (the reduction keeps them per row);
- visibility (``score_norm="mean"``) counts layers, not heads: summed over stages only;
- key norms: summed over ranks, counting a KV head that tensor parallelism copies to
  several ranks (more ranks than KV heads) once.

Only the last pipeline stage needs the result (its TP rank 0 answers the scheduler): an
earlier stage sends its part without waiting for the sum, so it goes on to its next step
while the last stage is still on this one.

The transport is vLLM's own process groups (``get_tp_group()``, ``get_pp_group()``: their
gloo ``cpu_group``), with ``torch.distributed.all_reduce``: vLLM's
``GroupCoordinator.all_reduce`` sums only, and on CPU goes through its shared-memory
kernel meant for the model's activations.
"""

from __future__ import annotations

import torch

MAX_PENDING = 8  # contributions in flight per rank (a scored step sends at most four)


class RankReducer:
    """Sums and maxima of a step's score buffers over the TP group, then the PP group."""

    def __init__(self, groups: list, layer_groups: list, kv_replica: bool, async_groups: list = ()):
        self.groups = groups  # process groups every score is reduced over
        self.layer_groups = layer_groups  # those whose ranks hold different layers
        self.kv_replica = kv_replica  # this rank's KV heads are a copy another rank counts
        # Groups this rank only contributes to: an earlier pipeline stage, whose reduced scores nobody
        # reads. Its part goes out without waiting, so it starts its next step while the last stage
        # is still on this one (waiting there would keep the stages from overlapping).
        self.async_groups = list(async_groups)
        self._pending: list = []  # (work, tensor) of the contributions still in flight

    @classmethod
    def for_worker(cls, total_kv_heads: int) -> RankReducer | None:
        """The reducer of this worker process (None without TP or PP: nothing to reduce)."""
        from vllm.distributed import get_pp_group, get_tp_group

        tp, pp = get_tp_group(), get_pp_group()
        if tp.world_size == 1 and pp.world_size == 1:
            return None
        replicas = max(1, tp.world_size // max(1, total_kv_heads))
        groups = [g.cpu_group for g in (tp, pp) if g.world_size > 1]
        layer_groups = [pp.cpu_group] if pp.world_size > 1 else []
        async_groups = [pp.cpu_group] if pp.world_size > 1 and not pp.is_last_rank else []
        return cls(groups, layer_groups, kv_replica=tp.rank_in_group % replicas != 0, async_groups=async_groups)

    def wait(self) -> None:
        """Wait until this rank's contributions in flight are taken (the last stage reduced them)."""
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def _all_reduce(self, tensor: torch.Tensor, op, groups) -> None:
        if tensor.numel() == 0:
            return
        for group in groups:
            if any(group is g for g in self.async_groups):
                # The result here is not read (see async_groups): the tensor is kept until it is sent.
                while len(self._pending) >= MAX_PENDING:  # two steps back at least: long taken, as a rule
                    self._pending.pop(0)[0].wait()
                self._pending.append((torch.distributed.all_reduce(tensor, op=op, group=group, async_op=True), tensor))
            else:
                torch.distributed.all_reduce(tensor, op=op, group=group)

    def attention(self, sums: list[torch.Tensor], maxes: list[torch.Tensor], num_layers: int) -> int:
        """Reduce the step's per-request totals in place; the number of layers scored over all stages.

        On a rank with ``async_groups`` the results are partial: only the last stage's are the step's.
        """
        ReduceOp = torch.distributed.ReduceOp
        flat_sums = _flat(sums)
        self._all_reduce(flat_sums, ReduceOp.SUM, self.groups)
        _scatter(flat_sums, sums)
        flat_maxes = _flat(maxes)
        self._all_reduce(flat_maxes, ReduceOp.MAX, self.groups)
        _scatter(flat_maxes, maxes)
        layers = torch.tensor([float(num_layers)], dtype=torch.float64)
        self._all_reduce(layers, ReduceOp.SUM, self.layer_groups)
        return int(layers.item())

    def key_norms(self, totals: torch.Tensor) -> None:
        """Sum the step's key-norm totals (float64, flat) over ranks in place (partial with ``async_groups``)."""
        if self.kv_replica:
            totals.zero_()
        self._all_reduce(totals, torch.distributed.ReduceOp.SUM, self.groups)


def _flat(parts: list[torch.Tensor]) -> torch.Tensor:
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([p.reshape(-1).to(torch.float64) for p in parts])


def _scatter(flat: torch.Tensor, parts: list[torch.Tensor]) -> None:
    offset = 0
    for part in parts:
        n = part.numel()
        part.copy_(flat[offset : offset + n].view(part.shape))
        offset += n

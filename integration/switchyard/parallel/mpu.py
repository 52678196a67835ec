"""The ``mpu`` object DeepSpeed's engine queries (Megatron's naming), backed by our groups.

Every method DeepSpeed 0.19 calls on an mpu (``grep -rhoE "mpu\\.[a-z_]+" deepspeed/``) is here.
The model-parallel rank is the tensor-parallel rank; the model-parallel group (and its size) is tp × pp, the ranks
of one data-parallel replica, as in DeepSpeed's PipelineParallelGrid: ZeRO sums gradient norms over that group
and counts a replicated parameter on tensor rank 0 of each stage (``bwc_tensor_model_parallel_rank``), so every
stage's parameters count once. With pp = 1 the group is the tp group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.distributed as dist

    from switchyard.parallel.manager import ProcessGroupManager


class DeepSpeedMPU:
    def __init__(self, manager: "ProcessGroupManager") -> None:
        self._m = manager

    # tensor (= model) parallel
    def get_tensor_model_parallel_group(self) -> "dist.ProcessGroup":
        return self._m.group("tp")

    def get_tensor_model_parallel_rank(self) -> int:
        return self._m.rank("tp")

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._m.size("tp")

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._m.ranks("tp")[0]

    def get_model_parallel_group(self) -> "dist.ProcessGroup":
        return self._m.group("mp")

    def get_model_parallel_world_size(self) -> int:
        return self._m.size("mp")

    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size

    # data parallel (dense parameters)
    def get_data_parallel_group(self) -> "dist.ProcessGroup":
        return self._m.group("dp")

    def get_data_parallel_rank(self) -> int:
        return self._m.rank("dp")

    def get_data_parallel_world_size(self) -> int:
        return self._m.size("dp")

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self._m.ranks("dp")

    # pipeline parallel
    def get_pipeline_model_parallel_group(self) -> "dist.ProcessGroup":
        return self._m.group("pp")

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._m.rank("pp")

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._m.size("pp")

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size

    # expert groups (Megatron-Core names)
    def get_expert_model_parallel_group(self) -> "dist.ProcessGroup":
        return self._m.group("ep")

    def get_expert_model_parallel_rank(self) -> int:
        return self._m.rank("ep")

    def get_expert_model_parallel_world_size(self) -> int:
        return self._m.size("ep")

    def get_expert_data_parallel_group(self) -> "dist.ProcessGroup":
        return self._m.group("edp")

    def get_expert_data_parallel_rank(self) -> int:
        return self._m.rank("edp")

    def get_expert_data_parallel_world_size(self) -> int:
        return self._m.size("edp")

    def get_expert_tensor_parallel_group(self) -> "dist.ProcessGroup":
        return self._m.group("etp")

    def get_expert_tensor_parallel_rank(self) -> int:
        return self._m.rank("etp")

    def get_expert_tensor_parallel_world_size(self) -> int:
        return self._m.size("etp")

"""DeepSpeed glue: config loading with "auto" filling, MoE-aware optimizer parameter groups."""

from switchyard.deepspeed.config import fill_deepspeed_config, optimizer_param_groups, zero_stage

__all__ = ["fill_deepspeed_config", "optimizer_param_groups", "zero_stage"]

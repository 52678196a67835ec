"""DeepSpeed glue: config loading with "auto" filling, MoE-aware optimizer parameter groups, ZeRO-3 placement,
a fused ZeRO gradient norm and clip."""

from switchyard.deepspeed.config import fill_deepspeed_config, optimizer_param_groups, zero_stage
from switchyard.deepspeed.engine import initialize

__all__ = ["fill_deepspeed_config", "initialize", "optimizer_param_groups", "zero_stage"]

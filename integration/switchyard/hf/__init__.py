"""Hugging Face integration: adopt transformers' MoE blocks as switchyard layers."""

from switchyard.hf.adopt import SUPPORTED_BLOCKS, layer_from_hf_block, moe_config_from_hf

__all__ = ["SUPPORTED_BLOCKS", "layer_from_hf_block", "moe_config_from_hf"]

"""MoE layer math (single device): router, losses; experts and the layer are exported as they land."""

from switchyard.moe.router import Router, RouterOutput
from switchyard.moe.losses import load_balancing_loss, sequence_balance_loss, z_loss

__all__ = ["Router", "RouterOutput", "load_balancing_loss", "sequence_balance_loss", "z_loss"]

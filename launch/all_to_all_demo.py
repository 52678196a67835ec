"""Two ranks exchange tokens with switchyard's differentiable all-to-all (the EP transport).

    deepspeed --num_gpus 2 launch/all_to_all_demo.py          # CPU ranks with gloo, GPUs with NCCL

Each rank sends a different number of rows to each peer (like tokens routed to experts on other
ranks), checks what arrives, then checks the backward all-to-all returns gradients to their owners.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from switchyard import ProcessGroupManager
from switchyard.parallel import all_to_all


def main() -> None:
    manager = ProcessGroupManager(ep=_world())
    ep_group, ep_rank, ep_size = manager.group("ep"), manager.rank("ep"), manager.size("ep")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    # rank r sends (r + dst + 1) rows to rank dst; each row holds the sender's rank and the destination
    input_splits = [ep_rank + dst + 1 for dst in range(ep_size)]
    output_splits = [src + ep_rank + 1 for src in range(ep_size)]
    rows = [torch.tensor([[float(ep_rank), float(dst)]] * n) for dst, n in enumerate(input_splits)]
    x = torch.cat(rows).to(device).requires_grad_(True)
    y = all_to_all(x, output_splits, input_splits, ep_group)
    expected = torch.cat([torch.tensor([[float(src), float(ep_rank)]] * n) for src, n in enumerate(output_splits)])
    assert torch.equal(y.cpu(), expected), (y, expected)
    (y * (ep_rank + 1)).sum().backward()  # row grads carry the receiver's id + 1 back to the sender
    expected_grad = torch.cat([torch.full((n, 2), float(dst + 1)) for dst, n in enumerate(input_splits)])
    assert torch.equal(x.grad.cpu(), expected_grad), (x.grad, expected_grad)
    print(
        f"rank {manager.global_rank}/{manager.world_size}: sent {input_splits} rows, received {output_splits}; "
        "forward and backward all-to-all verified",
        flush=True,
    )
    # Leave together and tear the groups down before the interpreter does: a gloo rank exiting while its
    # peer still runs collectives' threads died once in CI with "terminate called without an active exception".
    dist.barrier()
    dist.destroy_process_group()


def _world() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


if __name__ == "__main__":
    from switchyard.parallel.process_exit import exit_without_teardown

    main()
    exit_without_teardown(0)

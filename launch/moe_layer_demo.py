"""An expert-parallel MoE layer on N ranks, checked against one process, then one DeepSpeed ZeRO-2 step.

    deepspeed --num_gpus 2 launch/moe_layer_demo.py [--experts 8 --top-k 2 --tokens 64]

Every rank builds the same ep=1 reference layer (same seed), reshards it into an ep=N layer through
the global-id state dict, routes its own tokens through the all-to-all and compares the output with
the reference run in-process. Then DeepSpeed's engine takes a step with our mpu and expert groups.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


CLIP = 1.0  # gradient clipping of the DeepSpeed step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--ffn", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--deepspeed-config", default="configs/deepspeed/zero2.json")
    parser.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    args = parser.parse_args()

    import deepspeed

    from switchyard.deepspeed import fill_deepspeed_config, optimizer_param_groups, zero_stage
    from switchyard.deepspeed.clipping import clip_global_grad_norm_
    from switchyard import MoEConfig, ProcessGroupManager
    from switchyard.moe.layer import MoELayer

    manager = ProcessGroupManager(ep=int(os.environ.get("WORLD_SIZE", "1")))
    rank = dist.get_rank()
    config = MoEConfig(num_experts=args.experts, top_k=args.top_k)
    torch.manual_seed(0)
    reference = MoELayer(config, args.hidden, args.ffn)
    layer = MoELayer(config, args.hidden, args.ffn, groups=manager)
    layer.load_state_dict(reference.state_dict())

    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(100 + rank))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), atol=1e-5, rtol=1e-5)
    stats = layer.last_stats
    counts = stats.tokens_per_expert_E.clone()
    dist.all_reduce(counts)
    if rank == 0:
        print(f"ep={manager.size('ep')}: rank 0 holds experts {layer.local_expert_ids}; output equals the "
              "single-process layer on every rank", flush=True)
        print("token copies per expert (all ranks):", counts.tolist(),
              f"imbalance max/mean = {float(counts.max() / counts.float().mean()):.2f}", flush=True)

    # stage 0 clips with DeepSpeed's per-rank norm, wrong with sharded experts: clip the global norm ourselves
    own_clipping = zero_stage(args.deepspeed_config) == 0
    ds_config = fill_deepspeed_config(args.deepspeed_config, micro_batch_size=args.tokens, grad_accum=1,
                                      dp_size=manager.size("dp"), clip=0.0 if own_clipping else CLIP,
                                      precision="fp32", ep_size=manager.size("ep"))
    params = optimizer_param_groups(layer, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=layer, optimizer=torch.optim.AdamW(params, lr=1e-3), config=ds_config,
                                      mpu=manager.mpu)
    loss = engine(x).square().mean() + layer.aux_loss
    engine.backward(loss)
    if own_clipping:
        clip_global_grad_norm_(layer, CLIP, manager)
    engine.step()
    if rank == 0:
        print(f"DeepSpeed ZeRO-{engine.zero_optimization_stage()} step done: loss {loss.item():.4f}, "
              f"expert grads reduced over edp group {manager.ranks('edp')}", flush=True)
    dist.barrier()  # leave together, groups torn down before the interpreter exits (see all_to_all_demo.py)
    dist.destroy_process_group()


if __name__ == "__main__":
    from switchyard.parallel.process_exit import exit_without_teardown

    main()
    exit_without_teardown(0)

"""The EP exchange's integers (moe/kernels/ep_regroup.py) against a first-principles oracle: label every received
row by (source rank, local expert, i), sort the labels by (local expert, source rank, i), and read the positions off.
The PyTorch route on CPU; the Triton launches on CUDA (gpu-marked)."""

from __future__ import annotations

import pytest
import torch

from switchyard.moe.kernels.ep_regroup import plan_counts, plan_counts_torch, regroup_index

CASES = [  # (ep, local experts, rows per chunk up to, share of empty chunks)
    (2, 4, 9, 0.0), (2, 32, 40, 0.3), (3, 5, 7, 0.5), (4, 1, 6, 0.2), (8, 16, 30, 0.4), (64, 4, 3, 0.6),
    (2, 128, 90, 0.1), (1, 8, 5, 0.0),
]


def _counts(ep: int, local: int, most: int, empty: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    send_E = torch.randint(0, most + 1, (ep * local,), generator=gen)
    recv_E = torch.randint(0, most + 1, (ep * local,), generator=gen)
    recv_E[torch.rand(ep * local, generator=gen) < empty] = 0
    return send_E, recv_E


def _oracle(send_E: torch.Tensor, recv_E: torch.Tensor, ep: int) -> dict[str, list]:
    local = recv_E.numel() // ep
    send, recv = send_E.view(ep, local).tolist(), recv_E.view(ep, local).tolist()
    labels = [(r, l, i) for r in range(ep) for l in range(local) for i in range(recv[r][l])]  # as delivered
    expert_major = sorted(labels, key=lambda t: (t[1], t[0], t[2]))
    where = {label: pos for pos, label in enumerate(expert_major)}
    arrived = {label: row for row, label in enumerate(labels)}
    per_local = [sum(recv[r][l] for r in range(ep)) for l in range(local)]
    return {
        "splits": [[sum(row) for row in send], [sum(row) for row in recv]],
        "per_local": per_local,
        "cu_offsets": [sum(per_local[:l]) for l in range(local + 1)],
        "dest": [where[label] for label in labels],
        "regroup": [arrived[label] for label in expert_major],
    }


def _check(device: torch.device, send_E: torch.Tensor, recv_E: torch.Tensor, ep: int) -> None:
    want = _oracle(send_E, recv_E, ep)
    plan = plan_counts(send_E.to(device), recv_E.to(device), ep)
    assert plan.splits_2R.tolist() == want["splits"]
    assert plan.per_local_L.tolist() == want["per_local"]
    assert plan.local_cu_offsets_L1.dtype == torch.int32 and plan.local_cu_offsets_L1.tolist() == want["cu_offsets"]
    dest_M, regroup_M = regroup_index(plan, int(recv_E.sum()))
    assert dest_M.tolist() == want["dest"]
    assert regroup_M.tolist() == want["regroup"]


@pytest.mark.parametrize("ep, local, most, empty", CASES)
def test_plan_and_regroup_match_the_oracle_on_cpu(ep, local, most, empty):
    for seed in range(3):
        _check(torch.device("cpu"), *_counts(ep, local, most, empty, seed), ep)


def test_nothing_received():
    send_E, recv_E = torch.tensor([3, 0, 2, 1]), torch.zeros(4, dtype=torch.long)
    _check(torch.device("cpu"), send_E, recv_E, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("ep, local, most, empty", CASES)
def test_triton_launches_match_the_oracle_and_the_torch_route(ep, local, most, empty):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    for seed in range(3):
        send_E, recv_E = _counts(ep, local, most, empty, seed)
        _check(device, send_E, recv_E, ep)
        got = plan_counts(send_E.to(device), recv_E.to(device), ep)
        ref = plan_counts_torch(send_E, recv_E, ep)
        for name in ("src_start_C", "shift_C"):  # the intermediate integers too
            assert getattr(got, name).cpu().tolist() == getattr(ref, name).tolist(), name
    _check(device, torch.tensor([3, 0, 2, 1]), torch.zeros(4, dtype=torch.long), 2)

"""The experts' six grouped GEMMs alone: ``torch._grouped_mm`` (CUTLASS, what the layer runs) against a Triton
grouped GEMM written here (pointer loads and TMA loads, every tile config of ``ROWS_CONFIGS`` /
``WGRAD_CONFIGS``) and a dense cuBLAS ``mm`` of the same FLOPs, on the MoE layer benchmark's shapes, bf16,
same inputs. It is the evidence for keeping torch._grouped_mm (docs/performance.md, "The grouped GEMMs").

Per shape: rows sorted by expert from a random top-k routing of ``--tokens`` tokens, then

    fwd1   x_NH @ w1[e].T      (gate+up)        bwd1_dx  grad_h_NO @ w1[e]
    fwd2   a_NF @ w2[e].T      (down)           bwd2_dx  grad_NH @ w2[e]
    bwd1_dw  grad_h[e].T @ x[e]                 bwd2_dw  grad[e].T @ a[e]

each timed with CUDA events (median of ``--iters`` after warm-up); the dense figure multiplies all rows by
one expert's weight. The Triton outputs are compared with ``torch._grouped_mm``'s (``rel_err``). Where QuACK is
installed (``pip install 'switchyard[quack]'``), its varlen GEMM (the layer's ``quack`` grouped-GEMM library,
integration/switchyard/moe/grouped_gemm.py) is timed too, with ``bit_equal`` against torch's output;
``--no-triton`` leaves out the Triton kernels and the layout variants (torch, QuACK and dense only).

    python benchmarks/grouped_gemm.py --out benchmarks/results/grouped_gemm.json   # one GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch installs come without Triton
    sys.exit("benchmarks/grouped_gemm.py needs a CUDA GPU and Triton (a CUDA build of torch)")

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from bench_common import _device_name, _git_commit, _versions  # noqa: E402

from switchyard.moe import grouped_gemm  # noqa: E402

SHAPES = {  # hidden, expert width, experts, top-k
    "olmoe": (2048, 1024, 64, 8),
    "qwen3_30b_a3b": (2048, 768, 128, 8),
    "finetune_llama_8x": (1536, 4096, 8, 2),
    "mixtral_8x7b": (4096, 14336, 8, 2),
}
ROWS_CONFIGS = [  # BM, BN, BK, warps, stages, GROUP_M
    (128, 256, 64, 8, 3, 8), (128, 256, 64, 8, 4, 8), (128, 128, 64, 8, 4, 8), (128, 128, 64, 4, 4, 8),
    (64, 256, 64, 4, 4, 8), (64, 128, 64, 4, 5, 8), (128, 256, 64, 8, 3, 1), (128, 128, 128, 8, 3, 8),
]
WGRAD_CONFIGS = [  # BM, BN, BK, warps, stages
    (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3), (64, 256, 64, 4, 4),
    (128, 256, 32, 8, 4),
]


# -- The Triton alternative ----------------------------------------------------------------------------------
# ``rows`` walks a flat list of row tiles (each expert's rows cut into BM-row tiles, at most cdiv(N, BM) + E of
# them); a program finds its expert from a prefix sum of the per-expert tile counts, in registers, and exits
# past the last tile. Rows of a tile past its expert's end are loaded but never stored. ``wgrad`` reduces over
# each expert's rows. Groups are int32 cumulative row ends read on the device, as torch._grouped_mm takes them.
@triton.jit
def _row_tile(offs_ptr, N, E: tl.constexpr, E_POW2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              GROUP_M: tl.constexpr):
    """(flat row tile, column tile, expert, first row, end row, row tiles in all) of this program. GROUP_M row
    tiles share a column sweep (b[e]'s tiles stay in L2 across them)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    group = pid // (GROUP_M * num_n)
    in_group = pid % (GROUP_M * num_n)
    tile_m = group * GROUP_M + in_group % GROUP_M
    tile_n = in_group // GROUP_M
    e_idx = tl.arange(0, E_POW2)
    valid = e_idx < E
    ends = tl.load(offs_ptr + e_idx, mask=valid, other=0)
    starts = tl.load(offs_ptr + e_idx - 1, mask=valid & (e_idx > 0), other=0)
    tiles = tl.where(valid, tl.cdiv(ends - starts, BM), 0)
    tile_ends = tl.cumsum(tiles, 0)
    total = tl.sum(tiles, 0)
    expert = tl.sum((tile_ends <= tile_m).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(e_idx < expert, tiles, 0), 0)
    row_start = tl.sum(tl.where(e_idx == expert, starts, 0), 0) + (tile_m - first_tile) * BM
    row_end = tl.sum(tl.where(e_idx == expert, ends, 0), 0)
    return tile_m, tile_n, expert, row_start, row_end, total


@triton.jit
def _store_row_tile(c_ptr, acc, row_start, row_end, tile_n, N, stride_cm, stride_cn, BM: tl.constexpr,
                    BN: tl.constexpr):
    """The tile's rows of its expert (not the next expert's rows it also computed) and columns within N."""
    rows = row_start + tl.arange(0, BM)
    cols = tile_n * BN + tl.arange(0, BN)
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows < row_end)[:, None] & (cols < N)[None, :])


@triton.jit
def _grouped_mm_rows_kernel(a_ptr, b_ptr, c_ptr, offs_ptr, N_ROWS, N, K,
                            stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
                            E: tl.constexpr, E_POW2: tl.constexpr, EVEN_NK: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    tile_m, tile_n, expert, row_start, row_end, total = _row_tile(offs_ptr, N, E, E_POW2, BM, BN, GROUP_M)
    if tile_m >= total:
        return
    rows = row_start + tl.arange(0, BM)
    rows_ld = tl.minimum(rows, N_ROWS - 1).to(tl.int64)
    cols = tile_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    a_ptrs = a_ptr + rows_ld[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_NK:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(ks[None, :] + k0) < K, other=0.0)
            b = tl.load(b_ptrs, mask=((ks[:, None] + k0) < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk
    _store_row_tile(c_ptr, acc, row_start, row_end, tile_n, N, stride_cm, stride_cn, BM, BN)


@triton.jit
def _grouped_mm_wgrad_kernel(g_ptr, x_ptr, c_ptr, offs_ptr, M, N,
                             stride_gn, stride_gm, stride_xn, stride_xk, stride_ce, stride_cm, stride_cn,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # c[e] = g[rows of e].T @ x[rows of e]: [M, N] per expert, reduction over the expert's rows
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    num_n = tl.cdiv(N, BN)
    tile_m = pid // num_n
    tile_n = pid % num_n
    row_end = tl.load(offs_ptr + expert)
    row_start = tl.load(offs_ptr + expert - 1, mask=expert > 0, other=0)
    ms = tile_m * BM + tl.arange(0, BM)
    ns = tile_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    mmask = ms < M
    nmask = ns < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(row_start, row_end, BK):
        rows = (k0 + ks).to(tl.int64)
        kmask = rows < row_end
        g = tl.load(g_ptr + rows[None, :] * stride_gn + ms[:, None] * stride_gm,
                    mask=kmask[None, :] & mmask[:, None], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xn + ns[None, :] * stride_xk,
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(g, x, acc)
    c_ptrs = c_ptr + expert.to(tl.int64) * stride_ce + ms[:, None] * stride_cm + ns[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _grouped_mm_rows_tma_kernel(a_desc, b_desc, c_ptr, offs_ptr, N, K, stride_cm, stride_cn,
                                E: tl.constexpr, E_POW2: tl.constexpr, B_KN: tl.constexpr,
                                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # as _grouped_mm_rows_kernel, operands through TMA: a as [N_ROWS, K] (rows past the end read as zeros),
    # b as [E*K, N] (B_KN) or [E*N, K] (b[e] stored transposed); K % BK == 0 so no tile crosses experts in K
    tile_m, tile_n, expert, row_start, row_end, total = _row_tile(offs_ptr, N, E, E_POW2, BM, BN, GROUP_M)
    if tile_m >= total:
        return
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = a_desc.load([row_start, k0])
        if B_KN:
            b = b_desc.load([expert * K + k0, tile_n * BN])
        else:
            b = b_desc.load([expert * N + tile_n * BN, k0]).T
        acc = tl.dot(a, b, acc)
    _store_row_tile(c_ptr, acc, row_start, row_end, tile_n, N, stride_cm, stride_cn, BM, BN)


# the weight-gradient products' other operand layouts (wgrad_layouts)
WGRAD_LAYOUTS = ("transposed_product", "k_major_operands", "k_major_operands_with_copies")


def median_ms(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def routed_offsets(tokens: int, experts: int, top_k: int, device: str) -> torch.Tensor:
    choice = torch.randn(tokens, experts, device=device).topk(top_k, dim=-1).indices
    counts = torch.bincount(choice.flatten(), minlength=experts)
    return torch.cumsum(counts, 0, dtype=torch.int32)


def rows_triton(a, b_EKN, offs, cfg, out=None):
    """c[rows of e] = a[rows of e] @ b[e] with the pointer kernel."""
    bm, bn, bk, warps, stages, group_m = cfg
    n_rows, k = a.shape
    num_experts, _, n = b_EKN.shape
    c = out if out is not None else a.new_empty((n_rows, n))
    max_tiles = triton.cdiv(n_rows, bm) + num_experts
    max_tiles = triton.cdiv(max_tiles, group_m) * group_m
    grid = (max_tiles * triton.cdiv(n, bn),)
    _grouped_mm_rows_kernel[grid](
        a, b_EKN, c, offs, n_rows, n, k, a.stride(0), a.stride(1), b_EKN.stride(0), b_EKN.stride(1),
        b_EKN.stride(2), c.stride(0), c.stride(1), E=num_experts, E_POW2=triton.next_power_of_2(num_experts),
        EVEN_NK=(n % bn == 0 and k % bk == 0), BM=bm, BN=bn, BK=bk, GROUP_M=group_m,
        num_warps=warps, num_stages=stages)
    return c


def rows_triton_tma(a, b_EKN, offs, cfg):
    """The same through TMA descriptors (b[e] given [K, N] row-major, or as the transpose of [N, K])."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, warps, stages, group_m = cfg
    n_rows, k = a.shape
    num_experts, _, n = b_EKN.shape
    if k % bk or n % bn:
        return None
    b_kn = b_EKN.stride(2) == 1
    if b_kn:
        b_desc = TensorDescriptor.from_tensor(b_EKN.reshape(num_experts * k, n), [bk, bn])
    else:  # b[e] is the transpose of a row-major [N, K]
        b_desc = TensorDescriptor.from_tensor(b_EKN.transpose(-2, -1).reshape(num_experts * n, k), [bn, bk])
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    c = a.new_empty((n_rows, n))
    max_tiles = triton.cdiv(triton.cdiv(n_rows, bm) + num_experts, group_m) * group_m
    grid = (max_tiles * triton.cdiv(n, bn),)
    _grouped_mm_rows_tma_kernel[grid](
        a_desc, b_desc, c, offs, n, k, c.stride(0), c.stride(1), E=num_experts,
        E_POW2=triton.next_power_of_2(num_experts), B_KN=b_kn, BM=bm, BN=bn, BK=bk, GROUP_M=group_m,
        num_warps=warps, num_stages=stages)
    return c


def wgrad_triton(g_NM, x_NK, offs, cfg):
    """c[e] = g[rows of e].T @ x[rows of e]."""
    bm, bn, bk, warps, stages = cfg
    m, n = g_NM.shape[1], x_NK.shape[1]
    num_experts = offs.shape[0]
    c = g_NM.new_empty((num_experts, m, n))
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), num_experts)
    _grouped_mm_wgrad_kernel[grid](
        g_NM, x_NK, c, offs, m, n, g_NM.stride(0), g_NM.stride(1), x_NK.stride(0), x_NK.stride(1),
        c.stride(0), c.stride(1), c.stride(2), BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    return c


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def quack_timing(fn, ref: torch.Tensor, iters: int) -> dict | None:
    """QuACK's product against torch's: time and bit equality (None where QuACK cannot run here)."""
    if grouped_gemm.quack_unfit(ref) is not None:
        return None
    got = fn()
    return {"ms": median_ms(fn, iters), "bit_equal": bool(torch.equal(got, ref)), "rel_err": rel_err(got, ref)}


def bench_shape(name: str, tokens: int, iters: int, tma: bool, layouts_only: bool = False,
                wgrad_names: tuple[str, ...] = WGRAD_LAYOUTS, triton_kernels: bool = True) -> dict:
    hidden, width, experts, top_k = SHAPES[name]
    dev = "cuda"
    torch.manual_seed(0)
    offs = routed_offsets(tokens, experts, top_k, dev)
    cu = torch.nn.functional.pad(offs, (1, 0))  # QuACK's cu_seqlens
    n = tokens * top_k
    bf = torch.bfloat16
    x = torch.randn(n, hidden, device=dev, dtype=bf)
    w1 = torch.randn(experts, 2 * width, hidden, device=dev, dtype=bf) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, width, device=dev, dtype=bf) / width ** 0.5
    a = torch.randn(n, width, device=dev, dtype=bf)
    grad_h = torch.randn(n, 2 * width, device=dev, dtype=bf)
    grad = torch.randn(n, hidden, device=dev, dtype=bf)
    gmm = torch._grouped_mm
    rows_cases = {  # name: (a, b[e] as [E, K, N])
        "fwd1": (x, w1.transpose(-2, -1)), "fwd2": (a, w2.transpose(-2, -1)),
        "bwd2_dx": (grad, w2), "bwd1_dx": (grad_h, w1),
    }
    wgrad_cases = {"bwd2_dw": (grad, a), "bwd1_dw": (grad_h, x)}
    out: dict = {"shape": dict(hidden=hidden, width=width, experts=experts, top_k=top_k, rows=n),
                 "counts_min_max": [int(c) for c in torch.diff(offs, prepend=offs.new_zeros(1)).aminmax()],
                 "gemms": {}}
    for case, (lhs, rhs) in rows_cases.items():
        ref = gmm(lhs, rhs, offs=offs)
        flops = 2 * n * lhs.shape[1] * rhs.shape[2]
        dense_a = lhs
        dense_b = rhs[0].contiguous() if rhs.stride(2) == 1 else rhs[0]
        row = {"flops": flops, "torch_grouped_mm_ms": median_ms(lambda: gmm(lhs, rhs, offs=offs), iters),
               "dense_mm_ms": median_ms(lambda: torch.mm(dense_a, dense_b), iters), "triton": {}, "triton_tma": {},
               "quack": quack_timing(lambda: grouped_gemm.rows_by_expert(lhs, rhs, cu, "quack"), ref, iters)}
        if triton_kernels:
            row["layouts"] = rows_layouts(lhs, rhs, offs, iters)
        for cfg in () if layouts_only or not triton_kernels else ROWS_CONFIGS:
            key = "x".join(map(str, cfg))
            try:
                got = rows_triton(lhs, rhs, offs, cfg)
                row["triton"][key] = {"ms": median_ms(lambda: rows_triton(lhs, rhs, offs, cfg), iters),
                                      "rel_err": rel_err(got, ref)}
            except Exception as exc:  # noqa: BLE001 - a config that does not fit (shared memory) is reported
                row["triton"][key] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            if tma:
                try:
                    got = rows_triton_tma(lhs, rhs, offs, cfg)
                    if got is not None:
                        row["triton_tma"][key] = {
                            "ms": median_ms(lambda: rows_triton_tma(lhs, rhs, offs, cfg), iters),
                            "rel_err": rel_err(got, ref)}
                except Exception as exc:  # noqa: BLE001
                    row["triton_tma"][key] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        out["gemms"][case] = row
        print(name, case, summarize(row), flush=True)
    for case, (g, xx) in wgrad_cases.items():
        ref = gmm(g.t(), xx, offs=offs)
        flops = 2 * n * g.shape[1] * xx.shape[1]
        row = {"flops": flops, "torch_grouped_mm_ms": median_ms(lambda: gmm(g.t(), xx, offs=offs), iters),
               "dense_mm_ms": median_ms(lambda: torch.mm(g.t(), xx), iters), "triton": {},
               "quack": quack_timing(lambda: grouped_gemm.weight_grad(g, xx, cu, "quack"), ref, iters)}
        if triton_kernels:
            row["layouts"] = wgrad_layouts(g, xx, offs, iters, wgrad_names)
        for cfg in () if layouts_only or not triton_kernels else WGRAD_CONFIGS:
            key = "x".join(map(str, cfg))
            try:
                got = wgrad_triton(g, xx, offs, cfg)
                row["triton"][key] = {"ms": median_ms(lambda: wgrad_triton(g, xx, offs, cfg), iters),
                                      "rel_err": rel_err(got, ref)}
            except Exception as exc:  # noqa: BLE001
                row["triton"][key] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        out["gemms"][case] = row
        print(name, case, summarize(row), flush=True)
    return out


def _k_major_rhs(b_EKN: torch.Tensor) -> bool:
    return b_EKN.stride(1) == 1


def rows_layouts(a: torch.Tensor, b_EKN: torch.Tensor, offs: torch.Tensor, iters: int) -> dict:
    """The same product with the weight stored the other way round (K-major <-> N-major): which layout
    CUTLASS's grouped kernel prefers, i.e. whether storing (or caching) the weights transposed would pay."""
    flipped = (b_EKN.contiguous() if _k_major_rhs(b_EKN)
               else b_EKN.transpose(-2, -1).contiguous().transpose(-2, -1))
    name = "rhs_n_major" if _k_major_rhs(b_EKN) else "rhs_k_major"
    ref = torch._grouped_mm(a, b_EKN, offs=offs)
    got = torch._grouped_mm(a, flipped, offs=offs)
    return {"layout": "rhs_k_major" if _k_major_rhs(b_EKN) else "rhs_n_major",
            name: {"ms": median_ms(lambda: torch._grouped_mm(a, flipped, offs=offs), iters),
                   "rel_err": rel_err(got, ref)}}


def wgrad_layouts(g_NM: torch.Tensor, x_NK: torch.Tensor, offs: torch.Tensor, iters: int,
                  names: tuple[str, ...] = WGRAD_LAYOUTS) -> dict:
    """Weight-gradient variants: the transposed product (``x.T @ g`` per expert, output ``[E, K, M]``), and both
    operands made K-major (row-grouped dim contiguous) first, timed with and without those copies."""
    gmm = torch._grouped_mm
    ref = gmm(g_NM.t(), x_NK, offs=offs)
    g_MN, x_KN = g_NM.t().contiguous(), x_NK.t().contiguous()
    out = {}
    for name, fn in {
        "transposed_product": lambda: gmm(x_NK.t(), g_NM, offs=offs),
        "k_major_operands": lambda: gmm(g_MN, x_KN.t(), offs=offs),
        "k_major_operands_with_copies": lambda: gmm(g_NM.t().contiguous(), x_NK.t().contiguous().t(), offs=offs),
    }.items():
        if name not in names:
            continue
        got = fn()
        got = got.transpose(-2, -1) if name == "transposed_product" else got
        out[name] = {"ms": median_ms(fn, iters), "rel_err": rel_err(got, ref)}
    return out


def summarize(row: dict) -> str:
    best = {}
    for kind in ("triton", "triton_tma"):
        timed = {k: v["ms"] for k, v in row.get(kind, {}).items() if "ms" in v}
        if timed:
            key = min(timed, key=timed.get)
            best[kind] = (key, round(timed[key], 4), round(row["torch_grouped_mm_ms"] / timed[key], 3))
    tf = row["flops"] / row["torch_grouped_mm_ms"] / 1e9
    layouts = {k: round(v["ms"], 4) for k, v in row.get("layouts", {}).items() if isinstance(v, dict)}
    quack = row.get("quack")
    quack_s = "n/a" if quack is None else f"{quack['ms']:.4f} (bit_equal {quack['bit_equal']})"
    return (f"grouped_mm {row['torch_grouped_mm_ms']:.4f} ms ({tf:.0f} TF/s), quack {quack_s}, "
            f"dense {row['dense_mm_ms']:.4f}, other layouts {layouts}, best {best}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["olmoe", "qwen3_30b_a3b", "finetune_llama_8x"],
                        choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-tma", action="store_true")
    parser.add_argument("--no-triton", action="store_true",
                        help="time torch._grouped_mm, QuACK and the dense mm only (no Triton kernels, no layouts)")
    parser.add_argument("--layouts-only", action="store_true",
                        help="time torch._grouped_mm in each operand layout, no Triton kernels")
    parser.add_argument("--wgrad-layouts", nargs="*", choices=WGRAD_LAYOUTS, default=list(WGRAD_LAYOUTS),
                        help="weight-gradient layouts to time (one per process isolates a layout the kernel rejects "
                             "with a device-side assert)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    meta = {"device": _device_name(torch.device("cuda")), **_versions(optional=("triton", "quack"), required=()),
            "git_commit": _git_commit(), "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
            "tokens": args.tokens, "iters": args.iters}
    result = {"meta": meta,
              "shapes": {s: bench_shape(s, args.tokens, args.iters, not args.no_tma, args.layouts_only,
                                         tuple(args.wgrad_layouts), not args.no_triton) for s in args.shapes}}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

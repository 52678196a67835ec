"""What the user sees: a progress bar and per-step line on rank 0, ``metrics.jsonl``, TensorBoard
events, and at the end a PNG heatmap of expert load per layer over training.

Only rank 0 writes; values arrive already reduced over the data-parallel group.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from switchyard.log import get_logger

if TYPE_CHECKING:
    from switchyard.moe.layer import MoELayer

log = get_logger(__name__)


class ExpertLoad:
    """Token copies per expert per MoE layer, summed over steps between ``take()`` calls (detached, on device)."""

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        self.dropped: dict[str, torch.Tensor] = {}
        self.routed: dict[str, int | torch.Tensor] = {}

    def add(self, name: str, counts: torch.Tensor, dropped: torch.Tensor, routed: int | torch.Tensor) -> None:
        if name in self.counts:
            self.counts[name] = self.counts[name] + counts
            self.dropped[name] = self.dropped[name] + dropped
            self.routed[name] += routed
        else:
            self.counts[name], self.dropped[name], self.routed[name] = counts.clone(), dropped.clone(), routed

    def add_forward(self, name: str, layer: MoELayer) -> None:
        """A MoE layer's last training forward: its own stats, which count real tokens' copies only (the patch_model
        hook hands the layer the batch's attention mask; dropless routing also routes padding rows)."""
        stats = layer.last_stats
        self.add(name, stats.tokens_per_expert_E, stats.dropped_copies, stats.routed_copies)

    def take(self) -> dict[str, torch.Tensor]:
        """Per layer ``[copies kept per expert (E)…, copies dropped, copies routed]`` as one float64 vector
        (this rank's: sum it over the data-parallel group, and first over the tp group for a layer whose tp ranks
        split the tokens (etp = 1), before taking shares or the dropped fraction)."""
        out = {name: torch.cat([c.double().reshape(-1), self.dropped[name].double().reshape(1).to(c.device),
                                torch.tensor([float(self.routed[name])], dtype=torch.float64, device=c.device)])
               for name, c in self.counts.items()}
        self.counts, self.dropped, self.routed = {}, {}, {}
        return out


def replaced_rows_name(start_step: int) -> str:
    """Where a run resumed at ``start_step`` keeps the rows of later steps that metrics.jsonl held before."""
    return f"metrics.after_step_{start_step:06d}.replaced.jsonl"


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int = 0) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.load_history: list[tuple[int, dict[str, list[float]]]] = []
        self.load_first: list[int] = []  # first step each load_history row counts (its last is the row's step)
        self._load_from = start_step + 1  # the expert-load counts restart at a resume: what they count from
        self._started = time.perf_counter()
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if path.is_file():  # a resumed run recomputes the steps after its checkpoint: their old rows go aside
            every = _read_rows(path)
            rows = [row for row in every if row["step"] <= start_step]
            dropped = [row for row in every if row["step"] > start_step]
            if dropped:  # a killed run's last steps, or an old branch's (its later checkpoints are kept too)
                aside = run_dir / replaced_rows_name(start_step)
                aside.write_text("".join(json.dumps(row) + "\n" for row in dropped))
                log.info("metrics.jsonl: its %d rows after step %d moved to %s (this run writes those steps again)",
                         len(dropped), start_step, aside.name)
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            # the heatmap covers the whole run, not only the steps after the resume
            loaded = [row for row in rows if "expert_load" in row]
            self.load_history = [(row["step"], row["expert_load"]) for row in loaded]
            # rows written before the first step was recorded counted every step since the previous row
            ends = [0] + [row["step"] for row in loaded]
            self.load_first = [row.get("expert_load_from", end + 1) for row, end in zip(loaded, ends)]
        self._jsonl = open(path, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops the killed run's events from the first recomputed step on (its event
        # files stay in the directory; without it every step after the checkpoint is shown twice)
        self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        from tqdm import tqdm

        self._bar = tqdm(total=total_steps, initial=start_step, desc="fine-tune", dynamic_ncols=True)

    def log(self, step: int, values: dict[str, Any], expert_fractions: dict[str, list[float]] | None = None) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time_s": round(time.perf_counter() - self._started, 3), **values}
        if expert_fractions:
            # the first step these counts cover: after a resume the checkpoint's step + 1, as the counts since the
            # previous row were not checkpointed; the heatmap leaves the steps between blank
            record["expert_load"], record["expert_load_from"] = expert_fractions, self._load_from
            self.load_history.append((step, expert_fractions))
            self.load_first.append(self._load_from)
            self._load_from = step + 1
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        shown = {k: values[k] for k in ("loss", "router_loss", "lr", "grad_norm", "tokens_per_s", "mfu")
                 if k in values}
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self._bar.update(n)

    def write_line(self, text: str) -> None:
        if self.enabled:
            self._bar.write(text)

    def close(self) -> Path | None:
        if not self.enabled:
            return None
        self._bar.close()
        self._tb.close()
        self._jsonl.close()
        return write_expert_load_heatmap(self.load_history, self.run_dir / "expert_load.png", self.load_first)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a job killed while writing leaves its last line torn, which is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_expert_load_heatmap(history: list[tuple[int, dict[str, list[float]]]], path: Path,
                              first_steps: list[int] | None = None) -> Path | None:
    """One panel per MoE layer: expert (y) × step (x), colour = fraction of the layer's token copies. A logged
    row counts steps ``first_steps[i]`` … its step (default: every step since the previous row), so its cell
    spans them: logged steps need not be evenly spaced (the last step, ``log_every`` changed at a resume), and
    steps no row counts (those between the last row before a resume and its checkpoint) stay blank."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    layers = list(history[-1][1])
    edges, columns = [0], []  # columns: an index into history, or None for a blank span
    for i, (step, _) in enumerate(history):
        start = max(first_steps[i] - 1, edges[-1]) if first_steps is not None else edges[-1]
        if start > edges[-1]:
            edges.append(start)
            columns.append(None)
        edges.append(step)
        columns.append(i)
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.6 + 1.2 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        num_experts = len(history[-1][1][layer])
        blank = [float("nan")] * num_experts
        grid = np.array([history[i][1].get(layer, blank) if i is not None else blank for i in columns]).T
        image = ax.pcolormesh(edges, np.arange(num_experts + 1) - 0.5, np.ma.masked_invalid(grid), cmap="viridis")
        ax.invert_yaxis()  # expert 0 on top
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # experts are whole numbers (2 experts: no "0.5")
        ax.set_ylabel("expert")
        ax.set_title(f"{layer}: fraction of token copies per expert", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.03)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

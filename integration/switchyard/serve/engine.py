"""The generation engine: a continuous-batching scheduler over slots, on rank 0.

    runner = ModelRunner(model, max_batch=16)       # every rank: executes step plans (runner.py)
    engine = Engine(runner, tokenizer)              # rank 0: decides the plans, samples, emits text
    engine.submit([Sequence(prompt_ids, SamplingParams(max_tokens=32, temperature=0), sink=print)])
    while engine.step(): pass

Every step the scheduler admits waiting sequences into free slots (FIFO) and writes a ``StepPlan``:
the slots freed since the last step, then one item per running sequence — a newcomer's whole prompt
(prefill) or a running one's last sampled token (decode). New requests therefore join between decode
steps; each sequence leaves on its own (EOS, stop string, max_tokens, context, abort) and frees its
slot. The plan is plain data, so rank 0 can broadcast it and every EP rank runs exactly the same
forwards and meets the others in every all-to-all. Sampling, detokenization and stop checks happen
here, on rank 0 only; the sampled token reaches the other ranks as the next plan's input.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from switchyard.log import get_logger
from switchyard.serve.runner import ModelRunner, StepPlan
from switchyard.serve.sampling import (IncrementalDetokenizer, SamplingParams, TokenLogprob, choice_logits,
                                       find_stop, make_generator, sample_token, token_logprobs)

__all__ = ["Engine", "EngineDraining", "ModelRunner", "Sequence", "SeqOutput", "StepPlan", "default_eos_ids"]

log = get_logger(__name__)

FINISH_REASONS = ("stop", "length", "abort")  # "abort" never reaches a client as such: see SeqOutput.error
# why a sequence ended unfinished while its client waits (SeqOutput.error_code; the app's status for each)
ENGINE_FAILED, SHUTTING_DOWN, NONFINITE_LOGITS = "engine_failed", "shutting_down", "nonfinite_logits"
STATS_EVERY = 32  # steps between copies of the per-expert counts to the host


class EngineDraining(RuntimeError):
    """The engine stopped taking new sequences (SIGTERM, or it failed); the server answers 503."""


@dataclass(frozen=True)
class SeqOutput:
    """What one step produced for one sequence: new text, the new token, and why it ended (if it did)."""

    index: int  # the choice index inside its request
    text: str
    token_id: int | None
    finish_reason: str | None
    logprob: TokenLogprob | None = None  # when the sequence asked for logprobs
    # the sequence ends unfinished ("abort") for this reason, which its client must be told (the engine failed, the
    # server stopped it, its logits broke); None with "abort": its client went away and nobody is left to tell
    error: str | None = None
    error_code: str | None = None  # ENGINE_FAILED, SHUTTING_DOWN or NONFINITE_LOGITS, with ``error``


_ids = itertools.count()


class Sequence:
    """One generated choice. ``sink`` is called on the engine's thread with each ``SeqOutput``."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[SeqOutput], None] | None = None,
                 index: int = 0) -> None:
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.seq_id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.index = index
        self.output_ids: list[int] = []
        self.text = ""  # emitted text (stop strings cut off)
        self.finish_reason: str | None = None
        self.aborted = False  # set from any thread; the engine finishes the sequence at its next step
        self.abort_error: str | None = None  # why, when its client is still waiting (``Engine.abort``)
        self.slot: int | None = None
        self.prefilled = False
        self.generator: torch.Generator | None = None
        self.detok: IncrementalDetokenizer | None = None
        self._decoded = ""  # all text so far, including what a stop string may still cut off
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, prompt={len(self.prompt_ids)}, out={len(self.output_ids)}, "
                f"slot={self.slot}, finish={self.finish_reason})")


class _NullMetrics:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class Engine:
    """Rank 0's scheduler. ``submit``/``abort``/``begin_drain`` are safe from any thread; ``step`` runs on one.

    ``broadcast`` (rank 0 → other ranks) is called with each plan before this rank executes it.
    """

    def __init__(self, runner: ModelRunner, tokenizer: Any, max_batch: int | None = None,
                 max_model_len: int | None = None,
                 eos_token_ids: list[int] | None = None, broadcast: Callable[[StepPlan], None] | None = None,
                 metrics: Any = None) -> None:
        max_batch = runner.max_batch if max_batch is None else max_batch
        if not 1 <= max_batch <= runner.max_batch:
            raise ValueError(f"max_batch must be in [1, {runner.max_batch}] (the runner's), got {max_batch}; "
                             f"build the ModelRunner with max_batch={max_batch}")
        if max_model_len is not None and max_model_len > runner.max_model_len:
            raise ValueError(f"max_model_len={max_model_len} exceeds the runner's {runner.max_model_len}; "
                             f"build the ModelRunner with max_model_len={max_model_len}")
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_model_len = max_model_len or runner.max_model_len
        if eos_token_ids is None:
            eos_token_ids = default_eos_ids(runner.model, tokenizer)
        self.eos_token_ids = set(eos_token_ids)
        self.broadcast = broadcast
        self.metrics = metrics or _NullMetrics()
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self._free_slots = list(range(max_batch - 1, -1, -1))  # pop() hands out slot 0 first
        self._to_release: list[int] = []
        self._inbox: deque[Sequence] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.draining = False
        self.failure: str | None = None  # why the engine can no longer step (``fail``)
        self.steps = 0
        self._unsynced_steps = 0
        self.last_plan: StepPlan | None = None

    # -- any thread --------------------------------------------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if len(seq.prompt_ids) + seq.params.max_tokens > self.max_model_len:
                raise ValueError(f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens ({seq.params.max_tokens}) "
                                 f"exceeds the model's context of {self.max_model_len} tokens")
        with self._lock:
            if self.draining:
                raise EngineDraining(self.refusal())
            self._inbox.extend(seqs)
        self.metrics.prompt_tokens(sum(len(s.prompt_ids) for s in seqs))
        self._wake.set()

    def abort(self, seq: Sequence, error: str | None = None) -> None:
        """End ``seq`` at the next step. ``error``: why, for a client still waiting (the server stops the request: it
        gets a 503 ``shutting_down``, not a 200 with a finish reason it cannot parse); None: the client went away."""
        seq.abort_error = error  # before the flag: the engine's thread reads the flag first
        seq.aborted = True
        self._wake.set()

    def abort_all(self, error: str) -> None:
        """End every sequence in flight at the next step, telling each client ``error`` (drain timeout, Ctrl-C twice).
        Call it on the engine's thread (it reads the running and waiting sequences)."""
        with self._lock:
            pending = list(self._inbox)
        for seq in [*self.running.values(), *self.waiting, *pending]:
            if not seq.aborted:  # one whose client went away keeps its silent abort
                self.abort(seq, error)

    def begin_drain(self) -> None:
        """Stop taking new sequences; those already submitted run to the end. Safe in a signal handler."""
        self.draining = True

    def refusal(self) -> str:
        """Why a new sequence is refused once draining: the failure, when there was one."""
        return f"{self.failure + '; ' if self.failure else ''}the server is shutting down and takes no new requests"

    def idle(self) -> bool:
        return not self._inbox and not self.waiting and not self.running

    def in_flight(self) -> int:
        """Sequences submitted and not finished (for logs; a racing submit may be missed)."""
        return len(self._inbox) + len(self.waiting) + len(self.running)

    def wait_for_work(self, timeout: float) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    # -- the engine's thread -----------------------------------------------------------------------------
    def step(self) -> StepPlan | None:
        """Admit, schedule, run one plan on every rank, sample; returns the plan (None: nothing to do)."""
        with self._lock:
            while self._inbox:
                self.waiting.append(self._inbox.popleft())
        self._reap_aborted()
        while self.waiting and self._free_slots:
            seq = self.waiting.popleft()
            seq.slot = self._free_slots.pop()
            seq.generator = make_generator(seq.params, seq.index, self.runner.device)
            seq.detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids)
            self.running[seq.slot] = seq
        items = [(slot, seq.prompt_ids if not seq.prefilled else [seq.output_ids[-1]], not seq.prefilled)
                 for slot, seq in sorted(self.running.items())]
        plan = StepPlan(items, self._to_release)
        self._to_release = []
        if not plan.items and not plan.release:
            if self._unsynced_steps:  # idle: the per-expert counts catch up
                self.runner.sync_stats()
                self._unsynced_steps = 0
            self.metrics.step(running=len(self.running), waiting=len(self.waiting), ran=False)
            return None
        if self.broadcast is not None:
            self.broadcast(plan)
        logits = self.runner.execute(plan)
        self._unsynced_steps += 1
        if self._unsynced_steps >= STATS_EVERY:
            self.runner.sync_stats()
            self._unsynced_steps = 0
        seqs = [self.running[slot] for slot, _, _ in plan.items]
        choose_from = choice_logits(logits, [seq.params for seq in seqs], [seq.output_ids for seq in seqs])
        # one device sync: every row's argmax, and which rows have no finite maximum (NaN anywhere, +inf, or all
        # -inf: a draw from them raises, an argmax is meaningless) — those sequences end alone, not the server
        argmax_R, broken_R = (torch.stack([choose_from.argmax(-1), (~choose_from.amax(-1).isfinite()).long()]).tolist()
                              if seqs else ([], []))
        broken = {i for i, bad in enumerate(broken_R) if bad}
        tokens = {i: argmax_R[i] for i, seq in enumerate(seqs) if seq.params.greedy and i not in broken}
        for i, seq in enumerate(seqs):
            if i not in tokens and i not in broken:
                tokens[i] = sample_token(choose_from[i], seq.params, seq.generator)
        wants = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None and i not in broken]
        logprobs: dict[int, TokenLogprob] = {}
        if wants:
            rows = logits[torch.tensor(wants, device=logits.device)]
            found = token_logprobs(rows, [tokens[i] for i in wants], [seqs[i].params.logprobs or 0 for i in wants])
            logprobs = dict(zip(wants, found))
        now = time.monotonic()
        for i, seq in enumerate(seqs):
            seq.prefilled = True
            if i in broken:
                log.error("sequence %d: the model's logits have no finite maximum (NaN/inf) after %d generated "
                          "tokens; ending it with an error", seq.seq_id, len(seq.output_ids))
                self._finish(seq, "abort", "", None, error=f"the model's logits had no finite value (NaN or inf) "
                             f"after {len(seq.output_ids)} generated tokens, so no token could be chosen; the "
                             "checkpoint or its dtype is at fault, not the request", error_code=NONFINITE_LOGITS)
            else:
                self._append(seq, tokens[i], now, logprobs.get(i))
        self.steps += 1
        self.last_plan = plan
        self.metrics.step(running=len(self.running), waiting=len(self.waiting) + len(self._inbox))
        return plan

    def fail(self, reason: str) -> None:
        """No step can run any more (a rank died): every sequence in flight ends now with an output whose ``error``
        says so, not with a finish reason a client would take for a complete answer, and new ones are refused
        (``refusal``). Call it on the engine's thread, after ``step`` raised."""
        with self._lock:
            self.failure, self.draining = reason, True
            pending = list(self._inbox)
            self._inbox.clear()
        error = f"{reason}; the server is shutting down"
        for seq in [*self.running.values(), *self.waiting, *pending]:
            seq.finish_reason = "abort"
            self.metrics.finished(seq)
            self._emit(seq, SeqOutput(seq.index, "", None, "abort", error=error, error_code=ENGINE_FAILED))
        self.running.clear()
        self.waiting.clear()

    def heartbeat(self) -> None:
        """An empty plan: keeps the other ranks' wait for the next plan from timing out while idle."""
        if self.broadcast is not None:
            self.broadcast(StepPlan())

    def _reap_aborted(self) -> None:
        for seq in [s for s in self.waiting if s.aborted]:
            self.waiting.remove(seq)
            self._finish(seq, "abort", "", None, error=seq.abort_error, error_code=SHUTTING_DOWN)
        for seq in [s for s in self.running.values() if s.aborted]:
            self._finish(seq, "abort", "", None, error=seq.abort_error, error_code=SHUTTING_DOWN)

    def _append(self, seq: Sequence, token: int, now: float, logprob: TokenLogprob | None = None) -> None:
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.metrics.first_token(now - seq.arrival_time)
        else:
            self.metrics.token_gap(now - (seq.last_token_time or now))
        seq.last_token_time = now
        seq.output_ids.append(token)
        self.metrics.generated_tokens(1)
        assert seq.detok is not None
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            return self._finish(seq, "stop", seq._decoded[len(seq.text):] + seq.detok.flush(), token, logprob)
        before = len(seq._decoded)
        seq._decoded += seq.detok.push(token)
        stops = seq.params.stop
        if stops:
            longest = max(map(len, stops))
            at = find_stop(seq._decoded, stops, max(0, before - longest + 1))
            if at >= 0:
                return self._finish(seq, "stop", seq._decoded[len(seq.text):at], token, logprob)
        full = len(seq.prompt_ids) + len(seq.output_ids) >= self.max_model_len
        if len(seq.output_ids) >= seq.params.max_tokens or full:
            return self._finish(seq, "length", seq._decoded[len(seq.text):] + seq.detok.flush(), token, logprob)
        # hold back a tail that could be the start of a stop string
        safe_end = len(seq._decoded) - (max(map(len, stops)) - 1 if stops else 0)
        delta = seq._decoded[len(seq.text):safe_end] if safe_end > len(seq.text) else ""
        seq.text += delta
        self._emit(seq, SeqOutput(seq.index, delta, token, None, logprob))

    def _finish(self, seq: Sequence, reason: str, delta: str, token: int | None,
                logprob: TokenLogprob | None = None, error: str | None = None, error_code: str | None = None) -> None:
        assert reason in FINISH_REASONS
        seq.text += delta
        seq.finish_reason = reason
        if seq.slot is not None:
            self.running.pop(seq.slot, None)
            self._free_slots.append(seq.slot)
            self._to_release.append(seq.slot)
            seq.slot = None
        self.metrics.finished(seq)
        self._emit(seq, SeqOutput(seq.index, delta, token, reason, logprob, error=error,
                                  error_code=error_code if error is not None else None))

    def _emit(self, seq: Sequence, out: SeqOutput) -> None:
        if seq.sink is not None:
            seq.sink(out)

    def run_until_idle(self, max_steps: int = 100_000) -> int:
        """Step until nothing is left (tests, offline use); returns the number of steps."""
        steps = 0
        while steps < max_steps and self.step() is not None:
            steps += 1
        return steps


def default_eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The generation config's EOS ids (what ``generate`` stops on), else the tokenizer's."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    elif isinstance(eos, (list, tuple)):
        ids.extend(int(e) for e in eos)
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return ids

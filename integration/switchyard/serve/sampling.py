"""Per-sequence token choice and text: sampling parameters, the sampler, incremental detokenization.

Single-device math, no threads, no HTTP: the engine calls these once per generated token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from switchyard.log import get_logger

log = get_logger(__name__)

MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's chat limit)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for each logit_bias value: [-100, 100]
MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]
SAMPLING_EPS = 1e-5  # temperatures below this are greedy (vLLM's _SAMPLING_EPS): logits / 1e-40 are inf
_MIX = 0x9E3779B97F4A7C15  # spreads (seed, choice index) over the generator's seed space
PROMPT_CONTEXT = (4, 23)  # prompt tokens decoded ahead of the output (IncrementalDetokenizer): fewest, most


@dataclass(frozen=True)
class SamplingParams:
    """What one sequence asks for; a temperature below ``SAMPLING_EPS`` is greedy (``generate(do_sample=False)``)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # the k most likely tokens only (vLLM's and generate()'s top_k); 0 or -1 is off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits before the choice
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence of the token in the output

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (-1 or 0: off), got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        for token_id, bias in self.logit_bias:
            if not isinstance(token_id, int) or token_id < 0 or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias entries must be (token id >= 0, bias in [-{MAX_LOGIT_BIAS:g}, "
                                 f"{MAX_LOGIT_BIAS:g}]), got {(token_id, bias)!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        """The one place deciding argmax vs a draw: a tiny temperature is greedy, not a division overflowing to inf."""
        return self.temperature < SAMPLING_EPS

    @property
    def adjusts_logits(self) -> bool:
        """Whether the token is chosen from anything but the model's own logits."""
        return bool(self.logit_bias) or bool(self.presence_penalty) or bool(self.frequency_penalty)


def make_generator(params: SamplingParams, choice_index: int, device: torch.device) -> torch.Generator | None:
    """A private generator per sequence: a seeded request samples the same tokens whatever else runs."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed((params.seed * _MIX + choice_index) % (1 << 63))
    return generator


def choice_logits(logits_RV: torch.Tensor, params_R: list[SamplingParams],
                  outputs_R: list[list[int]]) -> torch.Tensor:
    """The logits each token is chosen from: row r plus its ``logit_bias``, minus OpenAI's penalties on the tokens
    it generated so far, ``mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty`` (all on the logits,
    before temperature and top-p). A copy when any row changes: the raw logits stay for the reported logprobs (as
    vLLM's). The counts are rebuilt from the output ids each step, only for the rows that ask for a penalty."""
    if not any(params.adjusts_logits for params in params_R):
        return logits_RV
    adjusted_RV = logits_RV.clone()
    for r, (params, output_ids) in enumerate(zip(params_R, outputs_R)):
        row_V = adjusted_RV[r]
        if params.logit_bias:
            ids, values = zip(*params.logit_bias)  # index_add_: an id named twice ("7", "07") gets both biases
            row_V.index_add_(0, torch.tensor(ids, device=row_V.device),
                             torch.tensor(values, dtype=row_V.dtype, device=row_V.device))
        if (params.presence_penalty or params.frequency_penalty) and output_ids:
            ids_N = torch.tensor(output_ids, device=row_V.device)  # index_add_, not bincount: no device sync
            counts_V = torch.zeros_like(row_V).index_add_(0, ids_N, torch.ones_like(ids_N, dtype=row_V.dtype))
            penalty_V = counts_V * params.frequency_penalty + (counts_V > 0) * params.presence_penalty
            row_V.sub_(penalty_V.to(row_V.dtype))
    return adjusted_RV


def sample_token(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from the last position's logits ``[V]`` (temperature, then top-k, then nucleus, then a draw: the
    order of generate()'s warpers and vLLM's sampler)."""
    if params.greedy:
        return int(torch.argmax(logits_V))
    logits_V = logits_V.float()
    # the largest shifted to 0 first (softmax does not change): near SAMPLING_EPS the division cannot reach +inf
    scaled_V = (logits_V - logits_V.max()) / params.temperature
    if 0 < params.top_k < scaled_V.numel():  # ties with the k-th stay, as in generate()'s TopKLogitsWarper
        scaled_V = scaled_V.masked_fill(scaled_V < torch.topk(scaled_V, params.top_k).values[-1], float("-inf"))
    if params.top_p < 1:
        sorted_V, order_V = torch.sort(scaled_V, descending=True)
        probs_V = torch.softmax(sorted_V, dim=-1)
        # drop a token once the tokens before it already hold top_p of the mass (the first always stays)
        drop_V = probs_V.cumsum(-1) - probs_V >= params.top_p
        sorted_V = sorted_V.masked_fill(drop_V, float("-inf"))
        scaled_V = torch.full_like(scaled_V, float("-inf")).scatter(0, order_V, sorted_V)
    probs_V = torch.softmax(scaled_V, dim=-1)
    return int(torch.multinomial(probs_V, 1, generator=generator))


TokenLogprob = tuple[float, tuple[tuple[int, float], ...]]  # (chosen token's, top (id, logprob) pairs)


def token_logprobs(logits_RV: torch.Tensor, tokens_R: list[int], top_n: list[int]) -> list[TokenLogprob]:
    """Log-probabilities of the chosen tokens under the model's distribution (log-softmax of the raw
    logits: before temperature and top-p, as vLLM reports them) and each row's ``top_n`` best; one copy
    to the host for all rows."""
    logp_RV = torch.log_softmax(logits_RV.float(), dim=-1)
    chosen_R = logp_RV.gather(1, torch.tensor(tokens_R, device=logp_RV.device).view(-1, 1)).view(-1)
    k = max(top_n)
    if k:
        top_val_RK, top_idx_RK = logp_RV.topk(k, dim=-1)
        values, ids = top_val_RK.tolist(), top_idx_RK.tolist()
    chosen = chosen_R.tolist()
    return [(chosen[r], tuple(zip(ids[r][:n], values[r][:n])) if n else ()) for r, n in enumerate(top_n)]


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids.

    A byte-level token may end inside a multi-byte character; such text is held back until the next
    token completes it (or ``flush`` at the end), so the deltas concatenate to the same text as decoding
    all ids at once. The output is decoded after a few of the prompt's last tokens (vLLM's way), because
    a SentencePiece decoder (Llama-2, Mistral, Mixtral: Metaspace + ``Strip``) drops the leading space of
    the first token it decodes: decoded alone, the completion of "The capital of France" read "is Paris."
    instead of " is Paris.". A fast (Rust) tokenizer streams through ``tokenizers``' ``DecodeStream`` (one
    Rust call per token: this runs for every sequence at every step on rank 0); others decode a short
    window twice per token. ``DecodeStream`` raises ("Invalid prefix encountered") when a byte-fallback
    run turns invalid and so changes text it already returned (vLLM #17448); in the engine's thread that
    killed the server, so the sequence continues on the window path, which never raises.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int] | tuple[int, ...] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = self._context(list(prompt_ids))
        self.ids: list[int] = list(context)  # the prompt's context, then the output
        self.emitted = 0  # characters the stream has returned, the context's included (its flush decodes the rest)
        self.prefix_offset = 0  # window start: decoded together with the new ids for context
        self.read_offset = len(context)  # ids before this are already in the emitted text (or are the prompt's)
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if self._backend is not None:
            try:
                from tokenizers.decoders import DecodeStream
            except ImportError:  # tokenizers < 0.21
                self._backend = None
            else:
                self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
                for token_id in context:
                    if self._stream_step(token_id) is None:  # the stream failed on the prompt: window from the start
                        self.prefix_offset, self.read_offset = 0, len(context)
                        break

    def _context(self, prompt_ids: list[int]) -> list[int]:
        """The shortest prompt tail of 4 to 23 tokens that decodes to whole characters (vLLM's choice); else
        its last 4 tokens (a prompt ending inside a character: no clean start within reach)."""
        for n in range(min(len(prompt_ids), PROMPT_CONTEXT[0]), min(len(prompt_ids), PROMPT_CONTEXT[1]) + 1):
            if "\ufffd" not in self._decode(prompt_ids[-n:]):
                return prompt_ids[-n:]
        return prompt_ids[-PROMPT_CONTEXT[0]:]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _stream_step(self, token_id: int) -> str | None:
        """The stream's text for ``token_id`` (already in ``self.ids``); None once the stream has failed."""
        assert self._stream is not None
        try:
            text = self._stream.step(self._backend, token_id) or ""
        except Exception as err:  # tokenizers raises a bare Exception
            log.warning("incremental detokenization: %s; this sequence continues on the window decoder", err)
            self._stream = None
            # the ids before this one count as emitted; a few of them stay as the window's context
            self.read_offset = len(self.ids) - 1
            self.prefix_offset = max(0, self.read_offset - PROMPT_CONTEXT[0])
            return None
        self.emitted += len(text)
        return text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self._stream is not None:
            text = self._stream_step(token_id)
            if text is not None:
                return text
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished byte sequence at the very end)."""
        if self._stream is not None:
            rest = self._decode(self.ids)[self.emitted:]  # one full decode, once per sequence
            self.emitted += len(rest)
            return rest
        if self.read_offset == len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):] if len(text) > len(prefix) else ""


def find_stop(text: str, stops: tuple[str, ...], start: int) -> int:
    """Index of the earliest stop string in ``text`` beginning at or after ``start`` (-1: none)."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


# sampling settings a model's generation_config.json may carry, used for the ones a request leaves out (as vLLM does)
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k")


def generation_defaults(model: Any) -> dict[str, Any]:
    """The sampling settings the model's ``generation_config`` sets (those differing from transformers' defaults:
    Qwen3's temperature 0.6, top_p 0.95, top_k 20), which a request's unset fields take; ``{}`` without one."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    written = config.to_diff_dict()
    return {name: written[name] for name in GENERATION_DEFAULTS if written.get(name) is not None}


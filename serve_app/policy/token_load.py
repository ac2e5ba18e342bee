"""A replica's load in tokens: the prompt tokens it still has to prefill, and the KV tokens its requests add.

The count of running requests says little once prompts differ: one 6,000-token prompt is more prefill than a
hundred short chats, and the old per-output-token knee read that prefill as a slow engine (docs/qos.md). The
gateway sees enough per request to count tokens without tokenising: the prompt's characters (tokens = chars /
a ratio learned from the engines' own usage counts), how much of it the replica probably has cached
(`prefix_index`), and `max_tokens`. A request's prefill is pending from its dispatch to its first token, which
the Router reports; the measured rate of those prefills gives the budget of pending prefill a replica is given
before the gateway holds the rest in its class queues. Pure: numbers in, numbers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from serve_app.policy.priority import Priority

DEFAULT_CHARS_PER_TOKEN = 4.0
DEFAULT_OUTPUT_TOKENS = 256


@dataclass(frozen=True)
class PromptShape:
    """What a Router sends of a request for placing it: cheap to compute and to send."""

    chars: int = 0
    blocks: tuple[int, ...] = ()  # prefix_index.block_hashes of the prompt
    max_tokens: int | None = None


class TokenEstimates:
    """Characters to tokens, and the expected output of a request without `max_tokens`: moving averages of what
    the engines report in each answer's usage (weight `alpha` per sample)."""

    def __init__(self, alpha: float = 0.05) -> None:
        self.chars_per_token = DEFAULT_CHARS_PER_TOKEN
        self.mean_output_tokens = float(DEFAULT_OUTPUT_TOKENS)
        self._alpha = alpha

    def prompt_tokens(self, chars: int) -> int:
        return max(1, math.ceil(chars / self.chars_per_token))

    def output_tokens(self, max_tokens: int | None) -> int:
        return max_tokens if max_tokens else max(1, round(self.mean_output_tokens))

    def learn(self, chars: int | None, prompt_tokens: int | None, output_tokens: int | None) -> None:
        a = self._alpha
        if chars and prompt_tokens and prompt_tokens > 0:
            ratio = min(max(chars / prompt_tokens, 0.5), 16.0)  # a templated chat adds tokens of its own
            self.chars_per_token = (1 - a) * self.chars_per_token + a * ratio
        if output_tokens:
            self.mean_output_tokens = (1 - a) * self.mean_output_tokens + a * output_tokens


@dataclass(eq=False)
class Work:
    """One request's expected work on the replica it was placed on."""

    priority: Priority
    prompt_tokens: int
    cached_tokens: int  # expected from that replica's prefix cache
    output_tokens: int
    prefilling: bool = True  # until its first token comes back

    @property
    def prefill_tokens(self) -> int:
        return max(self.prompt_tokens - self.cached_tokens, 1)

    @property
    def kv_tokens(self) -> int:
        """The KV cache it adds beyond what is shared: its uncached prompt and its output."""
        return self.prefill_tokens + self.output_tokens


@dataclass
class ReplicaLoad:
    """The tokens of work one replica holds, from the gateway's own count of what it sent there."""

    pending: dict[Priority, int] = field(default_factory=lambda: dict.fromkeys(Priority, 0))
    kv_tokens: int = 0

    @property
    def pending_prefill(self) -> int:
        return sum(self.pending.values())

    def pending_ahead_of(self, priority: Priority) -> int:
        """Prefill that runs before a new request of `priority`: the engine schedules by priority (vLLM's
        `--scheduling-policy priority`), so only that of its class and those above it."""
        return sum(tokens for k, tokens in self.pending.items() if k <= priority)

    def add(self, work: Work) -> None:
        self.pending[work.priority] += work.prefill_tokens
        self.kv_tokens += work.kv_tokens

    def prefilled(self, work: Work) -> None:
        if work.prefilling:
            work.prefilling = False
            self.pending[work.priority] -= work.prefill_tokens

    def remove(self, work: Work) -> None:
        self.prefilled(work)
        self.kv_tokens -= work.kv_tokens


class PrefillRate:
    """Prompt tokens per second a replica prefills. Each first token gives a sample: the prefill that was
    pending ahead of the request when it was sent, plus its own, over the time to its first token. A sample
    can only understate the rate (fixed overheads, decode steps in between), so the estimate is a maximum
    that decays by `decay` per sample: a slower engine is still learnt, in about 1/(1-decay) samples. Samples
    of fewer than `min_tokens` are mostly overhead and are left out."""

    def __init__(self, decay: float = 0.99, min_tokens: int = 256) -> None:
        self.decay = decay
        self.min_tokens = min_tokens
        self.tokens_per_s: float | None = None
        self.samples = 0

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens < self.min_tokens or seconds <= 0 or not math.isfinite(seconds):
            return
        sample = tokens / seconds
        self.samples += 1
        current = self.tokens_per_s
        self.tokens_per_s = sample if current is None else max(sample, current * self.decay)


@dataclass(frozen=True)
class PrefillBudget:
    """How much prefill may be pending ahead of a request on a replica before it waits in the gateway instead:
    `seconds` of it at the replica's measured rate, never less than `min_tokens`, unbounded until a rate is
    measured (a fresh replica is never held back on a guess).

    Class-aware, as the engine's queue is (`--scheduling-policy priority`): medium counts only the prefill of
    high and medium, since whatever low has pending runs after it. Counting low's too kept medium in the
    gateway behind low's backlog, where in bare vLLM it would have gone ahead of it: medium's TTFT p99 was 1.8x
    bare's at 1.5x capacity on an H200 (docs/benchmarks.md, seventh session). High is never held by it."""

    seconds: float = 1.0
    min_tokens: int = 8192

    def tokens(self, rate: PrefillRate) -> float:
        if rate.tokens_per_s is None:
            return math.inf
        return max(float(self.min_tokens), rate.tokens_per_s * self.seconds)

    def admits(self, load: ReplicaLoad, rate: PrefillRate, priority: Priority) -> bool:
        """Whether a request of `priority` may be sent now: while some budget is left (a request larger than
        the whole budget still goes once the replica has less pending than that)."""
        return priority == Priority.HIGH or load.pending_ahead_of(priority) < self.tokens(rate)

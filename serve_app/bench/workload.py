"""What the benchmark sends: prompts, output lengths and a priority mix, the same for every client mode."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_PROMPTS = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "List three tips for writing clear code.",
    "What is the capital of France, and what is it famous for?",
    "Summarise the plot of a heist story in one paragraph.",
    "Give a friendly greeting to a new colleague.",
    "Describe how a bicycle works to a child.",
    "What are the benefits of regular exercise?",
]


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: str
    priority: str | None
    max_tokens: int | None


def load_prompts(path: Path | None) -> list[str]:
    """A JSONL file of {"prompt": "..."} objects (or plain JSON strings), one per line."""
    if path is None:
        return list(BUILTIN_PROMPTS)
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        prompt = item if isinstance(item, str) else item.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path}:{number}: expected a string or an object with a 'prompt' string")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return prompts


def parse_priority_mix(text: str | None) -> dict[str, float]:
    """`high:0.2,medium:0.3,low:0.5` -> weights normalised to sum to 1."""
    if not text:
        return {}
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, _, weight = part.partition(":")
        if not weight:
            raise ValueError(f"priority mix entry {part!r} must look like name:weight")
        mix[name.strip()] = float(weight)
    total = sum(mix.values())
    if total <= 0 or any(w < 0 for w in mix.values()):
        raise ValueError("priority mix weights must be non-negative and not all zero")
    return {name: weight / total for name, weight in mix.items()}


def build_requests(
    count: int, prompts: list[str], max_tokens: int | None, priority_mix: dict[str, float], seed: int
) -> list[RequestSpec]:
    """Deterministic for a seed, so sync and async (and server A and B) get the very same requests."""
    rng = random.Random(seed)
    names, weights = list(priority_mix), list(priority_mix.values())
    specs = []
    for i in range(count):
        priority = rng.choices(names, weights)[0] if names else None
        specs.append(RequestSpec(i, prompts[i % len(prompts)], priority, max_tokens))
    return specs


def request_body(spec: RequestSpec, model: str, endpoint: str, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if spec.max_tokens is not None:
        body["max_tokens"] = spec.max_tokens
        if ignore_eos:
            body["ignore_eos"] = True
    return body


def arrival_times(count: int, rate: float, process: str, seed: int) -> list[float]:
    """Intended send offsets (s) for an open-loop run at `rate` requests/s."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate) if process == "poisson" else 1.0 / rate
    return times

"""What the benchmark sends: prompts, output lengths and a priority mix, the same for every client mode.

Prompts come from one of three workloads (`Workload`):
- fixed prompts (the built-in ones, or a JSONL file), cycled;
- `--prompt-tokens N`: synthetic prompts of about N tokens, each unique from its first words on;
- `--prefixes K --prefix-tokens L --suffix-tokens S`: K shared "system prompts" of about L tokens, each
  request one of them (uniformly at random) followed by its own suffix of about S tokens, in the spirit of
  `vllm bench serve`'s prefix_repetition dataset. Chat sends the prefix as the system message and the suffix
  as the user message; completions send them concatenated.
No tokenizer is needed: the text is common lowercase English words (`WORDS`), each one token for the Qwen
and Llama tokenizers when preceded by a space, so N words are about N tokens (a chat template adds a few).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
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

# Each of these is one token, with its leading space, for Qwen3's and SmolLM2's (Llama-style) tokenizers.
WORDS = tuple(
    """
the of and to in is it that was for on are as with his they at be this from have or by one had not but what
all were when we there can an your which their said if do will each about how up out them then she many some
so these would other into has more her two like him see time could no make than first been its who now
people my made over did down only way find use may water long little very after words called just where most
know get through back much go good new write our me man too any day same right look think also around
another came come work three word must because does part even place well such here take why things help put
years different away again off went old number great tell men say small every found still between name
should home big give air line set own under read last never us left end along while might next sound below
saw something thought both few those always looked show large often together asked house world going want
school important until form food keep children feet land side without boy once animals life enough took
sometimes four head above kind began almost live page got earth need far hand high year mother light parts
country father let night following picture being study second eyes soon times story boys since white days
paper hard near sentence better best across during today others however sure means knew try told young miles
sun ways thing whole hear example heard several change answer room sea against top turned learn point city
play toward five using himself usually money seen car morning given already family open garden river green
table window simple happy music market friend letter street train road summer winter spring common early
order power state black short class plan figure field rest able done rather watch ground stand real reason
person service law level start party area public local social late hour game team result question office
door health body history idea church face fact cause girl moment care court return doctor effect report
student war role group problem company system program government business
""".split()
)


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: str
    priority: str | None
    max_tokens: int | None
    system: str | None = None  # a shared prefix, sent as the system message (chat) or before the prompt


def words(rng: random.Random, count: int) -> str:
    """`count` words drawn from WORDS, joined by spaces: about `count` tokens."""
    return " ".join(rng.choices(WORDS, k=count)) if count > 0 else ""


def tagged_text(tag: str, tokens: int, rng: random.Random) -> str:
    """`tag` then random words, about `tokens` words in all (the tag counts, and is kept whole)."""
    rest = words(rng, tokens - len(tag.split()))
    return f"{tag} {rest}" if rest else tag


@dataclass(frozen=True)
class Workload:
    """Where each request's text comes from (see the module's docstring). Picklable, for split.py's processes."""

    prompts: tuple[str, ...] = tuple(BUILTIN_PROMPTS)
    prompt_tokens: int | None = None  # synthetic unique prompts of about this many tokens
    prefixes: int = 0  # shared-prefix workload: this many distinct prefixes ...
    prefix_tokens: int = 0  # ... of about this many tokens ...
    suffix_tokens: int = 0  # ... each request followed by a unique suffix of about this many
    prefix_seed: int = 0  # the prefixes come from this seed only: the same in every process and run

    def __post_init__(self) -> None:
        if self.prompt_tokens is not None and self.prompt_tokens < 1:
            raise ValueError("--prompt-tokens must be at least 1")
        if self.prefixes < 0:
            raise ValueError("--prefixes must not be negative")
        if self.prefixes and self.prompt_tokens is not None:
            raise ValueError("--prompt-tokens and --prefixes are two different workloads: give one")
        if self.prefixes and (self.prefix_tokens < 1 or self.suffix_tokens < 1):
            raise ValueError("--prefixes needs --prefix-tokens and --suffix-tokens, both at least 1")
        if not self.prefixes and (self.prefix_tokens or self.suffix_tokens):
            raise ValueError("--prefix-tokens and --suffix-tokens need --prefixes")
        if not self.prompts:
            raise ValueError("no prompts")

    @property
    def synthetic(self) -> bool:
        return self.prompt_tokens is not None or self.prefixes > 0

    def shared_prefixes(self) -> list[str]:
        """The K prefixes, from `prefix_seed` alone: each has its own number from its second word on."""
        return [
            tagged_text(
                f"system {k} seed {self.prefix_seed}:",
                self.prefix_tokens,
                random.Random(f"prefix/{self.prefix_seed}/{k}"),
            )
            for k in range(self.prefixes)
        ]

    def texts(self, count: int, seed: int, run: str = "") -> list[tuple[str | None, str]]:
        """(system, prompt) per request. Synthetic text starts with a tag unique to (request, seed, run), so
        two requests never share a cached prefix by accident; `run` tells apart runs that reuse a seed."""
        if not self.synthetic:
            return [(None, self.prompts[i % len(self.prompts)]) for i in range(count)]
        rng = random.Random(f"text/{seed}/{run}")
        label = f" run {run}" if run else ""
        if self.prompt_tokens is not None:
            return [(None, tagged_text(f"req {i} seed {seed}{label}:", self.prompt_tokens, rng)) for i in range(count)]
        prefixes = self.shared_prefixes()
        out: list[tuple[str | None, str]] = []
        for i in range(count):
            prefix = prefixes[rng.randrange(len(prefixes))]
            out.append((prefix, tagged_text(f"req {i} seed {seed}{label}:", self.suffix_tokens, rng)))
        return out


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("synthetic workloads (default: the fixed prompts)")
    group.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        help="each prompt about N tokens of common English words, unique per request from its first words on",
    )
    group.add_argument(
        "--prefixes",
        type=int,
        default=0,
        help="shared-prefix workload: K distinct prefixes (from --seed); each request takes one at random",
    )
    group.add_argument("--prefix-tokens", type=int, default=0, help="with --prefixes: each prefix about L tokens")
    group.add_argument(
        "--suffix-tokens", type=int, default=0, help="with --prefixes: each request's own suffix, about S tokens"
    )


def workload_from_args(args: argparse.Namespace, prompts: Sequence[str] | None = None) -> Workload:
    """Raises ValueError for a contradictory set of options."""
    if getattr(args, "prompts", None) and (args.prompt_tokens is not None or args.prefixes):
        raise ValueError("--prompts and a synthetic workload (--prompt-tokens, --prefixes) exclude each other")
    return Workload(
        prompts=tuple(prompts) if prompts is not None else tuple(BUILTIN_PROMPTS),
        prompt_tokens=args.prompt_tokens,
        prefixes=args.prefixes,
        prefix_tokens=args.prefix_tokens,
        suffix_tokens=args.suffix_tokens,
        prefix_seed=args.seed,
    )


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
    count: int,
    prompts: Sequence[str] | Workload,
    max_tokens: int | None,
    priority_mix: dict[str, float],
    seed: int,
    run: str = "",
) -> list[RequestSpec]:
    """Deterministic for a seed (and run), so sync and async (and server A and B) get the very same requests.
    `prompts`: a list, cycled, or a Workload."""
    workload = prompts if isinstance(prompts, Workload) else Workload(prompts=tuple(prompts))
    rng = random.Random(seed)  # the priorities: the same draws whatever the workload
    names, weights = list(priority_mix), list(priority_mix.values())
    specs = []
    for i, (system, prompt) in enumerate(workload.texts(count, seed, run)):
        priority = rng.choices(names, weights)[0] if names else None
        specs.append(RequestSpec(i, prompt, priority, max_tokens, system))
    return specs


def request_body(spec: RequestSpec, model: str, endpoint: str, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        system = [{"role": "system", "content": spec.system}] if spec.system else []
        body["messages"] = [*system, {"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = f"{spec.system}\n\n{spec.prompt}" if spec.system else spec.prompt
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

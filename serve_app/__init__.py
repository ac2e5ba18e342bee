"""Priority-aware LLM serving gateway on Ray Serve and vLLM."""

__version__ = "0.1.0"

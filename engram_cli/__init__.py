"""engram: build and analyze Engram tables (conditional N-gram memory for LLMs).

Follows DeepSeek's "Conditional Memory via Scalable Lookup" (arXiv 2601.07372). The package is a
library; the ``engram`` command is a thin layer on top of it (see ``engram_cli.commands``).

Heavy dependencies (torch, datasets, matplotlib) are imported lazily by the modules that need
them, so that ``import engram_cli`` and ``engram --help`` stay fast.
"""

__version__ = "0.1.0"

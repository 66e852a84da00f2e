"""The Engram + MoE model: its configuration, the mixture of experts, the Transformer with the
Engram module, and the sparsity allocation between experts and table slots.

Owns: ``config`` (:class:`ModelConfig`), ``moe`` (router, experts, load-balancing loss and the
plain-loop reference), ``transformer`` (:class:`Engram`, :class:`EngramModel`,
:func:`param_counts`), ``budget`` (:func:`allocate`: experts vs Engram slots at fixed total and
activated parameters) and ``store`` (:class:`RowStore`: one layer's table in RAM or in memory-mapped
sparse files, its optimizer row state, the lazy initialization :func:`initial_rows`).

Imports: ``engram_cli.core`` and ``engram_cli.tables`` (the plan and the hash).
"""

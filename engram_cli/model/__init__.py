"""The Engram + MoE model: its configuration, the mixture of experts, the Transformer with the
Engram module, and the sparsity allocation between experts and table slots.

Owns: ``config`` (:class:`ModelConfig`), ``moe`` (router, experts, load-balancing loss and the
plain-loop reference), ``transformer`` (:class:`Engram`, :class:`EngramModel`,
:func:`param_counts`), ``budget`` (:func:`allocate`: experts vs Engram slots at fixed total and
activated parameters), ``store`` (:class:`RowStore`: one layer's table in RAM or in memory-mapped
sparse files, its optimizer row state, the lazy initialization :func:`initial_rows`) and ``quant``
(table rows at serving precision: bf16, fp8 e4m3 with ue8m0 group scales;
:func:`quantize_dequantize`, :func:`quantization_error`, :func:`quantized_tables`).

Imports: ``engram_cli.core`` and ``engram_cli.tables`` (the plan and the hash).
"""

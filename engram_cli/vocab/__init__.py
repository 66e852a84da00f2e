"""Stage 1, ``engram normalize-vocab``: the tokenizer and its canonical vocabulary.

Owns: loading a tokenizer (the bundled DeepSeek one, a file, the hub) with its fingerprint and
the end-of-document token lookup (``tokenizer``: :func:`load_tokenizer`, :func:`find_eos_id`),
and the canonicalization of its vocabulary (``normalize``: :func:`normalize_vocab`,
:class:`VocabMap`, :func:`load_vocab`).

Imports: ``engram_cli.core`` only.
"""

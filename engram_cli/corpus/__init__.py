"""Corpus input, shared by every stage that reads text: what a corpus is, how each format is read,
the documents and tokens streamed from it, and the token cache.

Owns: ``spec`` (:class:`CorpusSpec`, :class:`Source`, :class:`CorpusStats`, resolving inputs to
sources), ``readers`` (text, JSONL, Parquet, ``datasets`` directories and hub datasets: the
:class:`Reader`), ``stream`` (:func:`iter_documents`, :func:`iter_tokenized`,
:func:`corpus_fingerprint`) and ``cache`` (:func:`load_or_build_token_cache`, :class:`TokenCacheWriter`:
a corpus tokenized once, written by build-tables while it counts, read by train, eval and sweep).

Imports: ``engram_cli.core`` only (the tokenizer is passed in, not loaded here).
"""

"""Stage 2, ``engram build-tables``: n-gram counts, the table plan, the hash, and what collisions cost.

Owns, in dependency order: ``keys`` (n-gram key packing, sorted runs and their merge),
``boundary`` (the document-boundary rule), ``stats`` (:class:`NgramStats`), ``counting``
(:class:`NgramCounter`, exact counting with spill-to-disk, :func:`merge_stats`), ``plan``
(:class:`TablePlan`, the multipliers and primes, :func:`make_plan`, :func:`replan`, the plan file),
``kernels`` and ``hashing`` (:func:`hash_ngrams`, the one hashing, and its plain reference),
``sizing`` (uniform-hashing predictions, sizes for a collision rate or memory budget),
``presets``, ``collisions`` and ``collision_plots``, ``hotrows``, ``shards`` and ``build``
(:func:`build_tables`, :func:`load_tables`).

Imports: ``engram_cli.core``, ``engram_cli.vocab``, ``engram_cli.corpus``.
"""

"""The foundation every stage stands on; nothing of the pipeline itself.

Owns: the error types the command line turns into one red line (``errors``: :class:`EngramError`
and its kinds, :class:`Interrupted`, :func:`first_line`), the progress callback (``progress``:
``ProgressFn``, :func:`report`), artifacts on disk (``artifacts``: atomic writes, manifests,
fingerprints, output locks, the two-rename swap, fsync — each once), every figure's style and
saving (``plotting``) and token text made readable (``text``).

Imports: nothing of engram_cli but the package version. Every other package may import it.
"""

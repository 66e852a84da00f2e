"""``python -m engram_cli`` runs the ``engram`` command."""

from engram_cli.cli import main

if __name__ == "__main__":
    main()

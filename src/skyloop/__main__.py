"""`python -m skyloop` is the `skyloop` command."""

from skyloop.cli.main import main

main()

"""``python -m flowyml`` is the ``flowyml`` command."""

from .cli import main

main()

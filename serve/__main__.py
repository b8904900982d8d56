"""``python -m serve CKPT``; see :mod:`serve.cli`."""

from .cli import main

main()

"""The command-line interface: `layercrit COMMAND …`, a thin layer over the library.

`app.py` holds `main` (exit codes, signals, warnings above progress bars) and the parser that
`commands/` fills, one module per command; `_args.py` holds the options commands share and
`_help.py` the help texts.
"""

from .app import main

__all__ = ["main"]

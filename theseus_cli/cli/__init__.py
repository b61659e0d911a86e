"""The command line: Typer verbs that parse options, call one library function each and render what it returns.

The library never imports this package."""

from theseus_cli.cli.app import app, main

__all__ = ["app", "main"]

"""The ``gradwatch`` command line: argument parsing only; the work lives in the package."""

from __future__ import annotations

import click

from gradwatch._version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gradwatch")
def main() -> None:
    """gradwatch: vanishing/exploding-gradient monitor for PyTorch RNNs."""


if __name__ == "__main__":  # pragma: no cover
    main()

"""Command-line interface: parses arguments and calls the library. Errors print one line and exit 2."""

from __future__ import annotations

import sys

import typer

from kvconvert.errors import KVConvertError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Convert a Hugging Face causal LM to fewer KV heads (MHA -> GQA), as a stock checkpoint.",
)


def _register() -> None:
    from kvconvert.cli import calibrate, compress, evaluate, heal  # noqa: F401  (commands register on import)


def _quiet_libraries() -> None:
    """kvconvert draws its own progress bars; silence the libraries' bars and info logs."""
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()


def main() -> None:
    _register()
    _quiet_libraries()
    try:
        app()
    except KVConvertError as exc:
        print(f"kvconvert: error: {exc}", file=sys.stderr)
        sys.exit(2)

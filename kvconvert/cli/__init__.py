"""Command-line interface: parses arguments and calls the library. Errors print one line and exit 2."""

from __future__ import annotations

import signal
import sys

import typer

from kvconvert.errors import Interrupted, KVConvertError

INTERRUPTED = (
    "interrupted; outputs are renamed into place only when complete, so none is partial: run the command again"
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Convert a Hugging Face causal LM to fewer KV heads (MHA -> GQA), as a stock checkpoint.",
)


@app.callback()
def _global_options(
    threads: int | None = typer.Option(
        None,
        "--threads",
        min=1,
        metavar="N",
        help="CPU threads for torch (default: $OMP_NUM_THREADS, else free physical cores: cores minus current load).",
    ),
) -> None:
    """Convert a Hugging Face causal LM to fewer KV heads (MHA -> GQA), as a stock checkpoint."""
    from kvconvert import threads as thread_policy

    thread_policy.apply(threads)


def _register() -> None:
    from kvconvert.cli import calibrate, compress, evaluate, heal, push, run  # noqa: F401  (commands register on import)


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


def _raise_interrupted(signum: int, _frame) -> None:
    raise Interrupted(signum)


def fail(message: str) -> None:
    """The CLI's error exit: one line on stderr, exit code 2."""
    print(f"kvconvert: error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    from kvconvert.threads import prepare_environment

    prepare_environment()  # before anything imports torch: idle OpenMP threads sleep instead of spinning
    _register()
    _quiet_libraries()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupted)
    try:
        app()
    except KVConvertError as exc:
        fail(str(exc))
    except Interrupted:
        fail(INTERRUPTED)

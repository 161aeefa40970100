"""Command-line interface: parses arguments and calls the library. Errors print one line and exit 2.

Nothing heavy (torch, transformers, datasets) is imported until a command has parsed its arguments, so
`kvconvert --help` and argument errors are fast.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import NoReturn

import typer

try:  # typer >= 0.29 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

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
    from kvconvert.cli import calibrate, compress, evaluate, heal, matryoshka, profile, push, run  # noqa: F401  (commands register on import)


def quiet_libraries() -> None:
    """kvconvert draws its own progress bars; silence the libraries' bars and info logs (imports transformers and
    huggingface_hub; `datasets`, 0.5 s to import and needed only to read text, through its environment variables
    unless it is loaded already)."""
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
    datasets = sys.modules.get("datasets")
    if datasets is None:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
    else:
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


_quiet_libraries = quiet_libraries


class StopSignals:
    """The CLI's SIGINT/SIGTERM handler: raises `Interrupted` and remembers that a signal came. C code the signal
    lands in may replace that exception by its own (torch turns it into "could not determine the shape of object
    type 'torch.storage.UntypedStorage'" while safetensors builds a tensor), which a read then reports as a bad
    file; `main` reports any failure after a signal as the interruption it is."""

    def __init__(self) -> None:
        self.received: int | None = None

    def __call__(self, signum: int, _frame) -> None:
        self.received = signum
        raise Interrupted(signum)


def fail(message: str) -> None:
    """The CLI's error exit: one line on stderr, exit code 2."""
    print(f"kvconvert: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    from kvconvert.threads import prepare_environment

    prepare_environment()  # before anything imports torch: idle OpenMP threads sleep instead of spinning
    _register()
    signals = StopSignals()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signals)
    try:
        try:
            code = app(standalone_mode=False)
        except Exception:
            if signals.received is not None:  # whatever the signal turned into on its way up
                raise Interrupted(signals.received) from None
            raise
    except click_errors.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help())
        sys.exit(2)
    except click_errors.UsageError as exc:
        hint = f" (see kvconvert {exc.ctx.info_name} --help)" if exc.ctx and exc.ctx.parent else ""
        fail(f"{exc.format_message()}{hint}")
    except click_errors.ClickException as exc:
        fail(exc.format_message())
    except (typer.Abort, KeyboardInterrupt):
        fail(INTERRUPTED)
    except KVConvertError as exc:
        fail(str(exc))
    except Interrupted:
        fail(INTERRUPTED)
    except OSError as exc:  # permissions, read-only or full disk, name too long: one line, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        fail(f"{exc.strerror or exc}{where}; nothing was replaced: free space or fix permissions, then run again")
    exit_without_teardown(code if isinstance(code, int) else 0)


def exit_without_teardown(code: int) -> NoReturn:
    """End the process as a normal exit would for kvconvert's outputs (other threads joined, `atexit` handlers run,
    stdio flushed) but without tearing the interpreter down: with torch and transformers loaded, that teardown
    (clearing some 2,500 modules) took about 1.2 s a command on a 2-core CPU, and every output is already closed,
    synced and renamed into place by then. `main` is the console entry point, so this ends the process."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            stream.flush()
    os._exit(code)

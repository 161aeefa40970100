"""User-facing errors: one line on stderr naming the fix, exit code 2."""


class KVConvertError(Exception):
    """An input problem the user can fix; the CLI prints it on one line and exits with code 2."""


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message, or its type's name when it has none: a library error inside ours."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (raised by the CLI's signal handlers).

    A BaseException, so `except Exception` blocks never mistake it for a read error, while cleanup blocks
    (`except BaseException`, `finally`) still remove temporary files before the CLI reports it.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

"""User-facing errors: one line on stderr naming the fix, exit code 2."""


class KVConvertError(Exception):
    """An input problem the user can fix; the CLI prints it on one line and exits with code 2."""

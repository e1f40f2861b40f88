"""How conversion reports: progress lines on stdout, and failures as exceptions that the command line prints as
one ``error:`` line on stderr."""


def progress(message):
    """One line of progress on stdout, flushed (a caller reading the pipe sees each step as it starts)."""
    print(message, flush=True)


class ConversionError(Exception):
    """Bad input or a failed step: reported as one ``error:`` line, exit status 1."""

    exit_code = 1


class UsageError(ConversionError):
    """Bad command-line arguments: exit status 2."""

    exit_code = 2


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A ``BaseException`` like ``KeyboardInterrupt``, so that no ``except Exception``
    on the way mistakes it for bad input, while every ``finally`` still cleans up; exit status 128 + signal."""

    def __init__(self, signal_number, signal_name):
        super().__init__(f"interrupted by {signal_name}")
        self.exit_code = 128 + signal_number


def first_line(error):
    """The first non-blank line of an exception's message (library errors can span many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def listing(names, limit=6):
    """``a, b, c and 4 more``: names for a one-line message."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

"""How the project reports bad input: one error family, one line on stderr, a non-zero exit code.

Every error that describes bad input (a config typo, a missing weights file, a corrupt checkpoint, a shape that
does not fit, a diverged run) derives from :class:`ReproError`. The command-line tools print those as one line
and exit with code 2; anything else is a bug (or the machine failing) and keeps its traceback. ``--debug`` or
``REPA_PROBE_DEBUG=1`` shows the traceback of a user error too. Out-of-memory errors get one line that names
the options that lower memory.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager

EXIT_USER_ERROR = 2
EXIT_OUT_OF_MEMORY = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
DEBUG_ENV = "REPA_PROBE_DEBUG"
MEMORY_HINT = "lower --batch-size (analysis) or train.batch_size / raise train.grad_accum (training)"


class ReproError(Exception):
    """Base class of every user-facing error of repa-probe: the message is one line that says what to fix."""


class CLIExit(SystemExit):
    pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, re-raised by the code that was writing an output with what the user finds there (one line)."""


def debug_enabled(flag: bool = False) -> bool:
    """True with ``--debug`` or ``REPA_PROBE_DEBUG`` set to a true value."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def first_line(exc: BaseException) -> str:
    """The first non-empty line of ``exc``'s message, or its class name when it has none."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else exc.__class__.__name__


def error_summary(exc: BaseException, limit: int = 160) -> str:
    """``"<ExcType>: <first line, at most limit characters>"`` (for messages that wrap a foreign error)."""
    text = first_line(exc) if str(exc).strip() else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(__import__("torch"), "OutOfMemoryError", None) if "torch" in sys.modules else None
    return (oom is not None and isinstance(exc, oom)) or isinstance(exc, MemoryError)


@contextmanager
def one_line_errors(debug: bool = False):
    """Print a :class:`ReproError` (or out-of-memory) as ``error: <Class>: <message>`` and exit non-zero.

    Other exceptions propagate unchanged with their traceback. With ``debug`` (or ``REPA_PROBE_DEBUG=1``)
    the traceback of a user error is logged before the one-line message. Ctrl-C is one line too
    (``interrupted: <what is left>``, from an :class:`Interrupted`) and exit code 130.
    """
    try:
        yield
    except KeyboardInterrupt as exc:
        if debug_enabled(debug):
            logging.getLogger("repa_probe").exception("traceback")
        note = first_line(exc) if isinstance(exc, Interrupted) and str(exc).strip() else \
            "stopped by Ctrl-C; files already written are whole (atomic writes); the same command " \
            "continues or redoes the rest"
        print(f"interrupted: {note}", file=sys.stderr)
        raise CLIExit(EXIT_INTERRUPTED) from None
    except (ReproError, MemoryError, RuntimeError) as exc:
        oom = _is_out_of_memory(exc)
        if not oom and not isinstance(exc, ReproError):
            raise
        if debug_enabled(debug):
            logging.getLogger("repa_probe").exception("traceback")
        if oom:
            print(f"error: out of memory ({first_line(exc)}): {MEMORY_HINT}", file=sys.stderr)
            raise CLIExit(EXIT_OUT_OF_MEMORY) from None
        print(f"error: {exc.__class__.__name__}: {first_line(exc)}", file=sys.stderr)
        raise CLIExit(EXIT_USER_ERROR) from None


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too: ``error: <message> (see --help)``, exit code 2."""

    def error(self, message):  # noqa: D401 - argparse hook
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def add_debug_flags(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` (debug logging) and ``--debug`` (tracebacks of user errors too) for every CLI."""
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of user errors too (or set {DEBUG_ENV}=1)")


def setup_logging(verbose: bool = False) -> None:
    """Log lines of the command-line tools: plain messages on stdout (debug level with ``verbose``)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stdout)

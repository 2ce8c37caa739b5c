"""How command-line tools report bad input: one line on stderr and a non-zero exit code."""
from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager

# Every library error that describes bad input derives from one of these (ConfigError, CheckpointError,
# EncoderWeightsError, VAEWeightsError, DatasetError, RunDirError, TrainingDiverged, ...).
USER_ERRORS = (ValueError, RuntimeError, OSError, KeyError)

EXIT_USER_ERROR = 2


class CLIExit(SystemExit):
    pass


@contextmanager
def one_line_errors(verbose: bool = False):
    """Turn library errors into ``error: <message>`` and exit code 2 (full traceback with ``verbose``)."""
    try:
        yield
    except USER_ERRORS as exc:
        if verbose:
            logging.getLogger("repa_probe").exception("traceback")
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        print(f"error: {exc.__class__.__name__}: {msg}", file=sys.stderr)
        raise CLIExit(EXIT_USER_ERROR) from None


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too: ``error: <message> (see --help)``, exit code 2."""

    def error(self, message):  # noqa: D401 - argparse hook
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def setup_logging(verbose: bool = False) -> None:
    """Log lines of the command-line tools: plain messages on stdout (debug level with ``verbose``)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stdout)

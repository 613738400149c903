"""What every part of the command line shares: the program's name, the error type that main()
prints on one line, `note` for the other lines the user reads, and the parser class whose
argument errors are one line. Everything else lives in a module named for its job."""
import argparse
import sys

PROG = "tokenprune"
DEBUG_ENV = "TOKENPRUNE_DEBUG"  # set: main() also prints the traceback of the original error


class CLIError(Exception):
    """Bad input: main() prints the message on one line and exits with status 1. Raise it
    `from` the original error: TOKENPRUNE_DEBUG=1 prints that error's traceback."""


def note(message):
    """One line for the user on stderr, prefixed like every tokenprune message."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an argument error is one line instead of a screenful of usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

"""The one way the command line swaps attributes for a while: `swapped`. `tokenprune eval` and
`sweep` swap names inside CLIP_benchmark (tokenprune/cli/evaluate.py, sweep.py), and loading a
model swaps OpenCLIP's loading steps for ones that say which step failed (`loading_errors`)."""
from contextlib import contextmanager


@contextmanager
def swapped(swaps):
    """Set attributes, (owner, name, value) each, for the duration of the block, and put the
    originals back afterwards, also when the block raises. An owner without that attribute is
    an AttributeError before anything is set."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    try:
        for owner, name, value in swaps:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(originals):
            setattr(owner, name, value)

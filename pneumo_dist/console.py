"""What the jobs print for a person: TensorFlow's start-up lines held back, Ctrl-C in one line.

TensorFlow's C++ start-up lines (oneDNN, CUDA probing, cuInit's error on a machine without a GPU, CPU
features) go to the process's stderr before absl's logging is set up, so TF_CPP_MIN_LOG_LEVEL does not
stop all of them: while TensorFlow loads and finds its devices, file descriptor 2 goes to a temporary
file, shown only if that fails. `--verbose` leaves everything as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

INTERRUPTED = 130  # a shell's exit status for a process ended by SIGINT (128 + 2)


def load_tensorflow(verbose: bool = False, find_devices: bool = True) -> None:
    """Import TensorFlow and (unless not `find_devices`: a driver that only starts Ray and leaves the
    devices to its actors) find its devices, quietly unless `verbose`. Call before anything else
    imports it (the jobs do, right after their arguments are parsed)."""
    if verbose:
        import tensorflow as tf

        if find_devices:
            tf.config.list_physical_devices("GPU")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's own INFO and WARNING lines after
    with _held_stderr():
        import tensorflow as tf

        if find_devices:
            tf.config.list_physical_devices("GPU")  # CUDA's probing, and cuInit's error without a GPU
    tf.get_logger().setLevel("ERROR")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)


@contextlib.contextmanager
def _held_stderr() -> Iterator[None]:
    """File descriptor 2 into a temporary file for the duration; its text is written out after all
    when the block raises (an import that fails must say why)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's, without "(default: None)" after an option whose help says what happens without it."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_verbose_argument(parser) -> None:
    parser.add_argument(
        "--verbose", action="store_true", help="show TensorFlow's (and Ray's) own start-up and log lines"
    )

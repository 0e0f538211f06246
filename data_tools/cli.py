"""What every command of the project shares: a one-line error and exit status 2 for bad input, option types
that check a value against its meaning, output paths that never replace an input, folders removed again
when a command fails, and Ctrl-C / SIGTERM turned into a clean stop.

Exit statuses of the commands (``data_tools/*.py``, ``pretrain/evaluate.py``, ``generate.py``, ``plot.py``):
0 success, 2 bad input (command line, files, data; the message names the flag or file and the way out),
130 interrupted (SIGINT or SIGTERM; nothing partial is left).  This module imports neither numpy nor torch.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import sys
import threading
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """Bad input to a command; ``str(e)`` is the one-line message (the command adds its name)."""


def fail(prog: str, message: str) -> int:
    """Print ``prog: error: message`` (one line) on stderr and return ``EXIT_ERROR``."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def interrupted(prog: str, what: str = "no output written") -> int:
    """Print ``prog: interrupted; <what>`` on stderr and return ``EXIT_INTERRUPTED``."""
    print(f"{prog}: interrupted; {what}", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def run_interruptible(prog: str, body: Callable[..., int], *args, what: str = "no output written") -> int:
    """``body(*args)``, the exit status it returns, with SIGINT raising ``KeyboardInterrupt`` from now on
    (``interrupt_as_exception``); when it is interrupted, ``interrupted(prog, what)`` (130)."""
    interrupt_as_exception()
    try:
        return body(*args)
    except KeyboardInterrupt:
        return interrupted(prog, what)


def run_command(prog: str, body: Callable[[], object], errors: Tuple[type, ...]) -> int:
    """Run ``body()``, a command's work, with SIGINT and SIGTERM raising ``KeyboardInterrupt`` inside it
    (``sigterm_as_interrupt``).  Returns ``EXIT_OK`` when it completes; ``fail`` (one line on stderr,
    ``EXIT_ERROR``) for an exception of a type in ``errors`` (bad input) or an ``OSError`` (naming its file);
    ``interrupted(prog)`` (``EXIT_INTERRUPTED``) when interrupted."""
    try:
        with sigterm_as_interrupt():
            body()
    except errors as e:
        return fail(prog, e)
    except OSError as e:
        return fail(prog, f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        return interrupted(prog)
    return EXIT_OK


class CommandParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump): ``prog: error: argument --top-p: must be in (0, 1],
    got '0' (see --help)``, exit status 2.  Sub-parsers are of the same class."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


# --------------------------------------------------------------------------------------- option types
def _number(kind: type, text: str, must: str) -> float:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {must}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {must}, got {text!r}")
    return value


def bounded(kind: type, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
            high_open: bool = False, hint: str = "") -> Callable[[str], float]:
    """An argparse ``type``: parse an ``int`` or a finite ``float`` and check ``low <= value <= high``
    (strict where ``low_open`` / ``high_open``; ``None`` = unbounded).  The error names the range and
    ``hint`` says what the values mean, e.g. ``must be in (0, 1] (1 = no nucleus filtering), got '0'``;
    argparse puts the flag in front."""
    noun = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        must = f"{noun} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        must = f"{noun} {'>' if low_open else '>='} {low}"
    elif high is not None:
        must = f"{noun} {'<' if high_open else '<='} {high}"
    else:
        must = noun
    if hint:
        must += f" ({hint})"

    def parse(text: str):
        value = _number(kind, text, must)
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {must}, got {text!r}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be {must}, got {text!r}")
        return value

    parse.__name__ = must
    return parse


def int_at_least(low: int, hint: str = "") -> Callable[[str], int]:
    """An argparse ``type`` for integers ``>= low``."""
    return bounded(int, low, hint=hint)


# ------------------------------------------------------------------------------------------- outputs
def same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name the same file (same inode when both exist, same absolute path
    otherwise)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_not_inputs(outputs: Iterable[str], inputs: Iterable[Tuple[str, str]], flag: str, value: str) -> None:
    """Raise ``CommandError`` when a file the command would write is one of its inputs.  ``inputs`` are
    ``(flag, path)`` pairs, so the message names both options: ``--output-prefix d writes d.bin, which is
    the input --input d.bin; choose another --output-prefix``."""
    inputs = [(f, p) for f, p in inputs if p]
    for out in outputs:
        for in_flag, path in inputs:
            if same_file(out, path):
                raise CommandError(f"{flag} {value} writes {out}, which is the input {in_flag} {path} (it would be "
                                   f"overwritten); choose another {flag}")


def check_output_folder(path: str, flag: str) -> None:
    """Raise ``CommandError`` when the folder that will hold ``path`` cannot be created or written: a
    parent that is a file, or a folder without write permission."""
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise CommandError(f"{flag} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        if probe == folder:
            raise CommandError(f"{flag} {path}: the folder {probe} is not writable (permission denied)")
        raise CommandError(f"{flag} {path}: cannot create its folder in {probe} (not writable: permission denied)")


def make_folders(folder: str) -> List[str]:
    """``os.makedirs(folder)``; return the folders it created, outermost first (empty when it existed), so
    that ``remove_folders`` can take them all away again."""
    folder = os.path.abspath(folder)
    missing = []
    probe = folder
    while not os.path.isdir(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    os.makedirs(folder, exist_ok=True)
    return list(reversed(missing))


def remove_folders(created: Sequence[str]) -> None:
    """Remove the folders ``make_folders`` created, innermost first, as long as they are empty (a folder
    that got other files meanwhile stays)."""
    for d in reversed(list(created)):
        try:
            os.rmdir(d)
        except OSError:
            return


@contextlib.contextmanager
def staged_dir(tmp: str, out_dir: str) -> Iterator[str]:
    """Write the folder ``out_dir`` through the temporary folder ``tmp`` (yielded): when the block completes,
    ``out_dir`` (if there) is removed and ``tmp`` renamed to it; when it raises, ``tmp`` is removed, ``out_dir``
    is left as it was, and the error goes on."""
    try:
        yield tmp
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(path: str, suffix: str = "") -> Iterator[str]:
    """Write the file ``path`` through a temporary file beside it (its name yielded; it ends in ``suffix``,
    for writers that go by the extension), making the folders it needs first: when the block completes, the
    temporary file is renamed to ``path`` (replacing it at once); when it raises, the temporary file and the
    folders made for it are removed, ``path`` is left as it was, and the error goes on."""
    folders = make_folders(os.path.dirname(os.path.abspath(path)))
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        remove_folders(folders)
        raise


# ------------------------------------------------------------------------------------------- signals
def interrupt_as_exception() -> None:
    """From now on SIGINT raises ``KeyboardInterrupt`` (Python's default), so that clean-up runs.  The
    command scripts start with SIGINT's default action (the process ends at once, no traceback) while
    they import, and call this at the start of ``main``.  A no-op outside the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGINT and SIGTERM raise ``KeyboardInterrupt`` in the main thread, so that a
    command's clean-up (temporary files, worker processes) runs for both.  A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupt_as_exception()

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def signals_deferred(reraise: bool = False) -> Iterator[None]:
    """Inside the block SIGINT and SIGTERM are held back, so that clean-up (or renaming finished files into
    place) is not cut short by a second Ctrl-C; with ``reraise`` one that arrived meanwhile is raised as
    ``KeyboardInterrupt`` at the end, else it is dropped (the command is ending anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if caught and reraise:
        raise KeyboardInterrupt

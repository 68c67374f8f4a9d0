"""Research tools of the repository, outside the ``mirasol_ray`` package (``pip install mirasol-ray`` ships none
of them): what the recipe learns, the README's recipe on a task of its own, a peer implementation's speed. See
README.md here. Each runs as ``python -m benchmarks.<tool>`` from the repository's root, and as ``mirasol bench
<tool>`` where ``mirasol_ray`` is installed from this checkout (``pip install -e .``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


def run_as_script(prog: str, doc: str | None, add_arguments: Callable[[argparse.ArgumentParser], None],
                  run: Callable[[argparse.Namespace], int], argv: list[str] | None = None) -> int:
    """A tool's ``main``: its arguments, then its run; a failure ends in one line and a non-zero exit, as
    ``mirasol`` ends (the traceback with ``MIRASOL_DEBUG=1``)."""
    from mirasol_ray.cli import one_line

    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").strip().splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(run(args) or 0)
    except Exception as e:
        if os.environ.get("MIRASOL_DEBUG"):
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2

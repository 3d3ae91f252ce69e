"""What every script shares: logging set-up and turning user mistakes into one-line errors."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from vlp.config import ConfigError


def setup_logging() -> None:
    """INFO on the main process, WARNING elsewhere (rank from the launcher's environment)."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("webdataset", "PIL", "matplotlib", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Run ``main(argv)``; a ConfigError (a user mistake) prints one line to stderr and exits with status 2."""
    prog = os.path.basename(sys.argv[0])
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)

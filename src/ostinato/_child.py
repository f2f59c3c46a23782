"""The entry point of an isolated loop's child process (see ``ostinato.isolation``)."""

from __future__ import annotations

import sys

from ostinato.isolation import main

if __name__ == "__main__":
    main(sys.argv[1:])

"""`python -m server [flags]` serves (like `tssc serve`); `python -m server generate ...` etc. also work."""

import sys

from server.cli import main

args = sys.argv[1:]
if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
    args = ["serve", *args]
raise SystemExit(main(args))

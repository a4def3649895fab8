"""`python -m reconciler.cli ARGS` = `retool ARGS`."""

from reconciler.cli.main import main

main()

"""`python -m sermtl.cli`: the same as the `sermtl` command."""

from sermtl.cli import main

main()

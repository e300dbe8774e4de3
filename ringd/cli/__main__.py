"""``python -m ringd.cli``: the same as ``ringctl``."""

from ringd.cli import main

main()

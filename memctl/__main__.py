"""``python -m memctl`` is the ``memctl`` command."""

from memctl.cli import main

main()

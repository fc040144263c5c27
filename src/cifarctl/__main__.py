"""Allow `python -m cifarctl` (and `torchrun -m cifarctl`)."""

from cifarctl.cli import main

main()

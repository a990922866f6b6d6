"""`python -m vdpad.cli`: the vdpad command, for an environment without its entry point script."""

from vdpad.cli import main

main(prog_name="vdpad")

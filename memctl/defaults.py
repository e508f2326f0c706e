"""Defaults the command line shows in `--help`, in a module without torch so that help stays instant."""

THRESHOLD = 3.0  # risk (a robust z-score) above which `memctl.detect` flags a prompt

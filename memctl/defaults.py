"""Defaults the command line shows in `--help`, in a module without torch so that help stays instant."""

COPY_RATIO = 1 / 3  # a sample is a copy when d1 < COPY_RATIO · d2 (Gu et al. 2023; `memctl.metrics`)
THRESHOLD = 3.0  # risk (a robust z-score) above which `memctl.detect` flags a prompt
ALPHA = 0.01  # p-value at or below which `memctl.signals.screen` (the default of `memctl detect`) flags a prompt
HOST = "127.0.0.1"  # `memctl ui` serves this machine only unless --host says otherwise
PORT = 7860  # `memctl ui`'s default port

"""`python -m memctl.ui [--model M] [--host H] [--port P] [--share] [--allow-hub] [--out DIR]`: serve the app."""

from memctl.ui.cli import main

raise SystemExit(main())

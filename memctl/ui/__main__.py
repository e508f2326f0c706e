"""`python -m ui [--model M] [--host H] [--port P] [--share] [--allow-hub] [--out DIR]`: serve the app."""

from ui.cli import main

raise SystemExit(main())

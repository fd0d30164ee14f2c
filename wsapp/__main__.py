"""`python -m wsapp [module:attribute]`: serve an app from an installed wsapp, as `server.py` does."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from wsapp.cli import main  # noqa: E402

sys.exit(main())

"""Run wsapp: `python server.py`. Reads $PORT, $HOST, WSAPP_APP and WSAPP_* from the environment;
drains on SIGTERM. The same as `python -m wsapp` (wsapp/cli.py), from a checkout of the repository."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from wsapp.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

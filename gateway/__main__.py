"""`python -m gateway` is the console script `xmpp-gateway`."""

import signal
import sys

# Until the gateway listens for SIGHUP (reload) itself, SIGHUP's default action would end
# the process: a supervisor passing it on to a worker still importing, say.
signal.signal(signal.SIGHUP, signal.SIG_IGN)

from gateway.app import main  # noqa: E402  (after the line above, on purpose)

sys.exit(main())

"""`python -m gateway` is the console script `xmpp-gateway`."""

import sys

from gateway.app import main

sys.exit(main())

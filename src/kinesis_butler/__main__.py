"""``python -m kinesis_butler`` is the ``kinesis-butler`` command."""

import sys

from kinesis_butler.cli import main

sys.exit(main())

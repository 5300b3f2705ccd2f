"""``python -m speechseq.cli``: the ``speechseq`` command."""

import sys

from speechseq.cli import main

sys.exit(main())

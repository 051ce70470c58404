"""``python -m medseg_monai.search``: the search's command line (:func:`medseg_monai.search.cli.main`)."""

import sys

from medseg_monai.search.cli import main

sys.exit(main())

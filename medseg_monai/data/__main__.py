import sys

from medseg_monai.data.cli import main

sys.exit(main())

import sys

from unimm.cli import main

sys.exit(main())

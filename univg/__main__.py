import sys

from univg.cli import main

sys.exit(main())

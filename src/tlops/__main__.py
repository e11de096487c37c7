import sys

from tlops.cli import main

sys.exit(main())

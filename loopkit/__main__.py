import sys

from loopkit.cli import main

sys.exit(main())

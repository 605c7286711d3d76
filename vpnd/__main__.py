import sys

from vpnd.cli import main

sys.exit(main())

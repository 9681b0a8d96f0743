import sys

from loraloom.app.cli import main

sys.exit(main())

"""`python -m loraloom …` is the `loraloom` command."""

import sys

from loraloom.app.cli import main

sys.exit(main())

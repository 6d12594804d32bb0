import sys

from prufed.cli import main

sys.exit(main())

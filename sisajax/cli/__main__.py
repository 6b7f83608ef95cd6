import sys

from sisajax.cli import main

sys.exit(main())

import sys

from gisp_plugin.cli import main

sys.exit(main())

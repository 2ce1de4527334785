import sys

from adapterkit.apps.cli import main

sys.exit(main())

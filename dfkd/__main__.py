import sys

from dfkd.cli import main

sys.exit(main())

import sys

from virtshift.cli import main

sys.exit(main())

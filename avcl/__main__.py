import sys

from avcl.cli import main


sys.exit(main())

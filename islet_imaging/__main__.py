import sys

from islet_imaging.cli import main

sys.exit(main())

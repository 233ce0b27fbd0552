"""`python -m data_prep ...` is `plait prep ...`."""
import sys

from data_prep.cli import main

sys.exit(main())

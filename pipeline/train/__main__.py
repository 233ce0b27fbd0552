"""`python -m pipeline.train ...` is `plait train ...` (the form the rendered sbatch scripts run under torchrun)."""
import sys

from pipeline.train.loop import main

sys.exit(main())

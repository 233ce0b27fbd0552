"""`python -m pipeline.train ...` is `plait train ...` (the form the rendered sbatch scripts run under torchrun),
with its one-line errors for bad input."""
import sys

import plait

sys.exit(plait.main(["train", *sys.argv[1:]]))

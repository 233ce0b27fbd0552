"""The first rows of the Debian package's Fashion-MNIST splits, as a smaller copy in the same format."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from pipeline.demo import FASHION_MNIST_DIR

SOURCE = Path(FASHION_MNIST_DIR)


def write_subset(out: Path, num_train: int, num_test: int) -> None:
    """The first rows of each real split, re-written in the idx gz format the Debian package ships."""
    out.mkdir(parents=True)
    for split, n in (("train", num_train), ("t10k", num_test)):
        images = gzip.open(SOURCE / f"{split}-images-idx3-ubyte.gz").read()
        labels = gzip.open(SOURCE / f"{split}-labels-idx1-ubyte.gz").read()
        header = np.frombuffer(images[:16], ">i4").copy()
        header[1] = n
        with gzip.open(out / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header.tobytes() + images[16:16 + n * 28 * 28])
        with gzip.open(out / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(np.array([2049, n], ">i4").tobytes() + labels[8:8 + n])

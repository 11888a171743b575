"""``python -m dkd_jax.experiment``: see :mod:`dkd_jax.experiment.cli`."""

import sys

from dkd_jax.experiment.cli import main

if __name__ == "__main__":
    sys.exit(main())

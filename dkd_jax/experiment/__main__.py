"""``python -m dkd_jax.experiment``: see :mod:`dkd_jax.experiment.cli`."""

import sys

from dkd_jax import host_memory

# Before the CLI's imports (orbax, tensorstore, JAX) can start a thread that allocates: once the
# one-arena limit is set, glibc hands existing arenas to new threads too (dkd_jax.host_memory).
host_memory.configure()

from dkd_jax.experiment.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

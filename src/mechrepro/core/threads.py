"""Thread count of the torch computations whose result depends on it.

A sum over many terms is added in a different order on one thread than on two, so a gradient,
a mean or an SVD can differ in the last bits between a job given one core and a job given two.
Code whose numbers must not depend on the cores Snakemake gives a job runs it under
:func:`one_thread`; forward passes do not depend on the thread count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed torch operations on one thread, then restore the previous count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)

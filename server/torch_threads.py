"""Which of uda-serve's threads run torch on several cores: the model threads, and no other.

torch's CPU thread pool on Linux is GNU OpenMP, which keeps a team of worker threads for every
thread that ever ran a parallel region. Once more of those workers exist than cores, every team
sleeps between parallel regions instead of spinning, and a forward pass pays a wake-up per
region: a ViT-B-16 pass at batch 1 took 68 ms instead of 52 ms in bf16, and 175 ms instead of
162 ms in fp32, on a 2-core VM, only because the base had been built (and images decoded) on
other threads than the one running the model. So every other thread that touches torch (the
one that builds the base, image decoders, residual loaders, HTTP handlers) runs it on one core,
which starts no team, and each model thread takes its share of the cores for itself.
"""
from __future__ import annotations

import torch


def use_cores(n: int) -> None:
    """The calling thread's torch ops use `n` cores from now on.

    torch also makes `n` the value that threads starting torch later take. Its one-time setup
    of a thread, at the thread's first torch call, takes that process-wide value; it is run
    here first, or a thread that set its own count before its first op would lose it to
    whatever another thread set meanwhile.
    """
    torch.get_num_threads()
    torch.set_num_threads(n)


def one_core() -> None:
    """For the threads of a pool that touches torch (as its `initializer`): no OpenMP team."""
    use_cores(1)


def cores() -> int:
    """The cores torch uses on the calling thread."""
    return torch.get_num_threads()

"""Under pytest-xdist (pyproject's addopts run one worker per core), each worker keeps to one torch thread: the
workers already fill the cores, and more threads per worker would only contend for them."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

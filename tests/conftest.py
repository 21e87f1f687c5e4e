"""Session set-up shared by every test file."""

import os

import torch

# Without a GPU, Triton kernels (puzzle.runtime.gemv) run in Triton's interpreter, on CPU tensors. The switch
# is read when triton is first imported, so it must be set before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

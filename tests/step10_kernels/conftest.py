"""Without a CUDA device, Triton kernels run under its interpreter (``TRITON_INTERPRET=1``: numpy,
exact, slow). Triton reads the variable when a kernel is decorated, so it is set here, before any
test module of this directory imports the kernels."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

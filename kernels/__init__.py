"""fastkd's Triton kernels, shipped as ``fastkd.kernels``.

One module per op (``distill_loss``, ...), each holding the ``@triton.jit`` kernels with their math
written above them and the host launchers that allocate outputs and pick block sizes. Registration
as torch custom ops, autograd and dispatch live in ``fastkd/ops/<op>.py``.

Importing this package requires triton; ``fastkd`` itself imports it lazily, only when the
``triton`` backend runs.
"""

"""Triton kernels of turnrl, installed as ``turnrl.kernels``.

One op per file, each with its torch reference and autograd Function beside
it (Liger-Kernel's layout). Importing this package needs neither torch nor
triton; each op module imports them itself.
"""

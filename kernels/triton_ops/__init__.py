"""Triton implementations, one op per module (kernels, then host launchers).

The launchers are called by the custom ops of ``kernels.ops`` (which hold the autograd formulas).
Imported lazily by ``kernels`` (only when the Triton backend is used), never at package import: triton
decides between compiling and interpreting (``TRITON_INTERPRET``) when a kernel is defined.
"""

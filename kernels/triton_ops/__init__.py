"""Triton implementations, one op per module (kernels, host launchers, autograd Function, in that order).

Imported lazily by ``kernels`` (only when the Triton backend is used), never at package import: triton
decides between compiling and interpreting (``TRITON_INTERPRET``) when a kernel is defined.
"""

"""Triton kernels and their launchers, one file per kernel family.

Imported lazily by fastcnn.ops (only when the triton backend runs), so that `import fastcnn` works
without Triton and so that TRITON_INTERPRET, read when a kernel is decorated, can still be set by
the caller before first use.
"""

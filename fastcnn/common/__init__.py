"""Internal helpers below every layer that runs kernels: the ops (fastcnn/ops) and the backends
under them (fastcnn/cpu, fastcnn/triton, the extension) import these, and these import none of
them. Allocation (alloc), output shapes and layouts (shapes), when the torch.library dispatcher
may be skipped (dispatch), the per-signature plans of a module (plans) and the caches keyed by a
weight (weight_cache)."""

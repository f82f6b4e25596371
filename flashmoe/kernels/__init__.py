"""Compute kernels: a plain torch reference for each op (these files), Triton versions beside them later."""

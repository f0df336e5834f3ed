"""Triton kernels for the GPU fast path: pure functions of tensors.

Owns no engine state and must not import from the engine, scheduler, runner or layers. Each
module holds one kernel family; its public wrapper checks shapes, allocates outputs and
launches. Submodules import Triton, so import them only where Triton is available.
"""

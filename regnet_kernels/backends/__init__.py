"""The two fused-op backends, peers that build on `regnet_kernels.ops` and never import
each other; only `regnet_kernels.ops.dispatch` loads them (docs/backends.md).

    triton/  the Triton kernels (`torch.ops.regnet_triton.*`): CUDA, or the CPU interpreter
    cpp/     the C++ extension (`torch.ops.regnet_kernels.*`): CPU kernels, and CUDA kernels
             where torch has CUDA; built on first use
"""

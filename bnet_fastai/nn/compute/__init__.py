"""How a BNET layer computes (`bnet_fastai.nn.layers` chooses by its `impl`): the torch path's one-saved-map training
step (`one_map`), the fused C++ kernels for CPU tensors (`cpp_bnet`, source in `csrc/`, built at first use) and
the fused Triton kernels for CUDA tensors (`triton_bnet`, imported only where a layer asks for them)."""

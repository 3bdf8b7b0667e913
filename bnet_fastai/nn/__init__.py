"""What you lift into your own models: the BNET layers (`layers`; how they compute in `compute`: the torch path's
one-map training step, the fused C++ kernels for CPU tensors and the fused Triton kernels for CUDA; timm's
norm+act form in `norm_act`), the torch.fx reading of a
network (`graph`), converting BatchNorm (`norms`), fusing for deployment (`fuse`), the study's architectures
(`models`), timm's `norm_layer=` route with what it leaves behind (`timm_route`), BNET's registration with timm
and fastai on `import bnet_fastai` (`registration`, torch-free) and BNET's weight-decay rule for fastai
(`weight_decay`). Imports nothing from the rest of the package but its torch-free helpers (`names`, `_checks`)."""

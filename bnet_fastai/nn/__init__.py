"""What you lift into your own models: the BNET layers (`layers`, timm's norm+act form in `norm_act`), the
torch.fx reading of a network (`graph`), converting BatchNorm (`norms`), fusing for deployment (`fuse`), the
study's architectures (`models`) and BNET's weight-decay rule for fastai (`weight_decay`). Imports nothing
from the rest of the package but its torch-free helpers (`names`, `_checks`)."""

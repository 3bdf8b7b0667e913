"""`python -m bnet_fastai ...` is the `bnet-fastai` command (for `accelerate launch -m` and `torchrun -m`)."""
import sys

from bnet_fastai.app.cli import main

sys.exit(main())

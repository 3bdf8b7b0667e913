"""One run: its settings (`config`, torch-free), the Learner it trains (`learner`), what to do with its folder
(`decision`: reuse, resume, locked), training it (`train`), per-epoch checkpoints and `load_model`
(`checkpoint`), its status and lock (`runstate`), its output (`progress`, `tensorboard_log`) and DDP
(`distributed`). Builds on `nn` and `data`."""

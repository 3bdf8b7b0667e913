"""DDP on CPU: two gloo processes train the same BNET model to identical weights; rank 0 writes the run."""
import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import torch

RANK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from bnet_fastai import BNET2d
    from bnet_fastai.distributed import distrib_ctx
    from bnet_fastai.train import RunConfig, build_learner, run

    out, rank = Path(sys.argv[1]), int(sys.argv[2])
    config = RunConfig(arch="xmininet", norm="bnet", dataset="sample", size=16, bs=32, epochs=1, fraction=0.2,
                       workers=0, lr=1e-2)
    learn, _ = build_learner(config)
    kernels = [m.weight.detach().clone() for m in learn.model.modules() if isinstance(m, BNET2d)]
    single_process_batches = len(learn.dls.train)
    with distrib_ctx(learn, sync_bn=False):
        learn.fit_one_cycle(1, 1e-2)
    torch.save({"state": learn.model.state_dict(), "kernels_before": kernels, "batches": learn.train_iter,
                "single_process_batches": single_process_batches},
               out / f"rank{rank}.pt")
    print(run(config, out / "exp")["status"])
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_end_with_identical_weights_and_trained_bnet_kernels(tmp_path):
    port, world = _free_port(), 2
    env = {**os.environ, "BNET_FASTAI_DATA": str(tmp_path / "data"), "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(r)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(world)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1] == "finished"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    kernels = [v for k, v in ranks[0]["state"].items() if k.endswith(".weight") and v.dim() == 4 and v.shape[1] == 1]
    assert len(kernels) == len(ranks[0]["kernels_before"]) == 15
    assert all(not torch.equal(a, b) for a, b in zip(kernels, ranks[0]["kernels_before"]))
    # each rank saw half of the batches of a single-process epoch
    assert ranks[0]["batches"] == ranks[1]["batches"] == math.ceil(ranks[0]["single_process_batches"] / 2) > 1
    run_dir = next(p for p in (tmp_path / "exp").iterdir() if p.is_dir())
    config = json.loads((run_dir / "config.json").read_text())
    assert config["training"]["world_size"] == 2
    assert len((run_dir / "history.csv").read_text().splitlines()) == 2

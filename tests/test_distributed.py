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
    from bnet_fastai.runs.distributed import distrib_ctx
    from bnet_fastai.runs.config import RunConfig
    from bnet_fastai.runs.learner import build_learner
    from bnet_fastai.runs.train import run

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
    # end the default group before exit, as torch asks: a gloo group left to the interpreter's shutdown can
    # abort the process ("terminate called without an active exception"), seen once in CI
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
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


PREPARE_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    import fastdownload.core
    import bnet_fastai.data.cache
    from fastai.callback.core import Callback
    from bnet_fastai.runs.config import RunConfig
    from bnet_fastai.runs.train import run

    out, rank, log = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])

    def logged(what, func):  # appends "<rank> <what>" to the shared log whenever the real work is done
        def wrapper(*args, **kw):
            with open(log, "a") as f:
                f.write(f"{rank} {what}\\n")
            return func(*args, **kw)
        return wrapper

    fastdownload.core.FastDownload.extract = logged("extract", fastdownload.core.FastDownload.extract)
    bnet_fastai.data.cache._write = logged("cache", bnet_fastai.data.cache._write)

    class SaveWeights(Callback):
        order = 100
        def after_fit(self):
            torch.save(self.learn.model.state_dict(), out / f"rank{rank}.pt")

    config = RunConfig(arch="xmininet", norm="bnet", dataset="imagenette-160", size=16, bs=4, epochs=1, workers=0)
    start = time.time()
    try:
        print(run(config, out / "exp", cbs=[SaveWeights()])["status"])
    except Exception as e:
        print(f"{type(e).__name__}: {e}")
    print(f"seconds {time.time() - start:.1f}")
""")


def _launch(tmp_path, script: str, args: list[str], env: dict) -> list[tuple[str, str]]:
    port, world = _free_port(), 2
    path = tmp_path / "rank.py"
    path.write_text(script)
    env = {**os.environ, **env, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(path), str(tmp_path), str(r), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(world)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [out.strip().splitlines() for out, _ in outputs]


def test_rank_0_alone_downloads_extracts_and_caches_and_both_ranks_train_alike(tmp_path):
    from tests.archives import serve, write_archive

    write_archive(tmp_path / "mirror" / "imagenette2-160.tgz", n_train=6, n_valid=2)
    requests, log = [], tmp_path / "work.log"
    with serve(tmp_path / "mirror", requests) as url:
        outputs = _launch(tmp_path, PREPARE_SCRIPT, [str(log)],
                          {"BNET_FASTAI_MIRROR": url, "BNET_FASTAI_DATA": str(tmp_path / "fresh-data")})
    assert [lines[-2] for lines in outputs] == ["finished", "finished"]
    assert requests == ["/imagenette2-160.tgz"]  # the archive was requested once
    assert sorted(log.read_text().splitlines()) == ["0 cache", "0 extract"]  # by rank 0 alone, once each
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in ranks[0])


def test_a_run_locked_by_another_process_ends_every_rank_promptly_with_the_same_message(tmp_path):
    import fcntl

    from bnet_fastai.runs.config import RunConfig

    env = {"BNET_FASTAI_DATA": str(tmp_path / "data")}
    config = RunConfig(arch="xmininet", norm="bnet", dataset="sample", size=16, bs=4, epochs=1, workers=0)
    locked = LOCKED_SCRIPT.replace("{config}", repr(config))
    (tmp_path / "exp").mkdir()
    with open(tmp_path / "exp" / f".{config.run_id}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # "another process" trains this run
        outputs = _launch(tmp_path, locked, [], env)
    messages = [lines[-2] for lines in outputs]
    assert messages[0] == messages[1] and messages[0].startswith("RunLocked: ")
    assert "is being trained by another process" in messages[0]
    assert all(float(lines[-1].split()[1]) < 60 for lines in outputs)  # not the DDP timeout (30 min)
    assert not (tmp_path / "exp" / config.run_id).exists()


LOCKED_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from bnet_fastai.runs.config import RunConfig
    from bnet_fastai.runs.train import run

    start = time.time()
    try:
        run({config}, Path(sys.argv[1]) / "exp")
        print("trained")
    except Exception as e:
        print(f"{type(e).__name__}: {e}")
    print(f"seconds {time.time() - start:.1f}")
""")

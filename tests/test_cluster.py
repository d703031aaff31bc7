"""Cluster seams: plain `srun` forms one process group, two runs never share an output folder,
the SLURM requeue recipe's signal path works, and device/GPU-count mistakes are refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from nnssl.errors import NnsslError
from nnssl.training.cluster import LOCK_NAME, RunLock, first_host, slurm_environment
from nnssl.training.distributed import free_port

TRAINER = "IJEPATrainer_Tiny_P32_BS2_1ep_2it"


@pytest.mark.parametrize("nodelist,host", [("node7", "node7"), ("gpu[03-05,9],cpu1", "gpu03"),
                                           ("a1,b2", "a1"), ("c[1,4]", "c1")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_environment_only_for_multi_task_srun_without_torchrun():
    base = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu[07-08]"}
    env = slurm_environment(base)
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(15000 + 4242 % 20000)}
    assert slurm_environment({**base, "SLURM_NTASKS": "1"}) is None  # sbatch with one task
    assert slurm_environment({**base, "RANK": "0", "WORLD_SIZE": "4"}) is None  # torchrun inside srun
    assert slurm_environment({}) is None


def test_a_held_lock_refuses_a_second_run_and_stale_locks_are_taken_over(tmp_path):
    with RunLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(NnsslError, match=f"pid {os.getpid()} on {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with RunLock(tmp_path):  # its process is gone
        pass
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(NnsslError, match="another run is writing"):
        RunLock(tmp_path).acquire()  # another host, recently refreshed: could be alive
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with RunLock(tmp_path):  # not refreshed for an hour
        pass


def test_training_refuses_a_folder_another_run_is_writing(roots):
    from nnssl.training.names import resolve_config
    from nnssl.training.options import RunOptions
    from nnssl.training.run import train

    fold = roots / "Dataset900_Phantoms" / f"{TRAINER}__nnsslPlans__onemmiso" / "fold_all"
    fold.mkdir(parents=True)
    (fold / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(),
                                              "slurm_job": "77", "started": "today"}))
    with pytest.raises(NnsslError, match="SLURM job 77"):
        train(RunOptions(device="cpu", num_workers=0, progress_bar=False), resolve_config(TRAINER))
    assert not list(fold.glob("checkpoint_*"))


def test_device_and_gpu_count_mistakes_are_refused_before_training(roots, capsys):
    from nnssl.cli.train import main

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only messages")
    for args in (["-device", "cuda:1"], ["-device", "cuda", "-num_gpus", "2"]):  # refused when parsed (status 2)
        with pytest.raises(SystemExit) as exit_:
            main(["900", "-tr", TRAINER, *args])
        assert exit_.value.code == 2 and "no CUDA device is visible" in capsys.readouterr().err


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_plain_srun_tasks_form_one_process_group(roots):
    """Two `srun` tasks (simulated by their SLURM variables) train one run as ranks 0 and 1."""
    port = str(free_port())
    args = [sys.executable, "-m", "nnssl.cli.train", "900", "-tr", TRAINER, "-np", "0", "-device", "cpu"]
    tasks = [subprocess.Popen(args, env=_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r),
                                             SLURM_JOB_ID="5", SLURM_JOB_NODELIST="localhost", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [t.communicate(timeout=300)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outputs
    fold = roots / "Dataset900_Phantoms" / f"{TRAINER}__nnsslPlans__onemmiso" / "fold_all"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "global batch 2 on 2 process(es)" in log
    assert len(list(fold.glob("training_log_*.txt"))) == 1 and not (fold / LOCK_NAME).exists()


def test_requeue_recipe_checkpoints_on_usr1_then_requeues(roots, tmp_path):
    """The SLURM recipe of documentation/training.md: `--signal=B:USR1@300` reaches the batch
    shell, whose trap forwards it to nnssl_train, waits for the checkpoint, then requeues."""
    trainer = "IJEPATrainer_Tiny_P32_BS2_50ep_2it"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'requeued'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    script = tmp_path / "job.sh"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        {sys.executable} -m nnssl.cli.train 900 -tr {trainer} -np 0 -device cpu --c &
        PID=$!
        trap 'kill -USR1 $PID; wait $PID; [ $? -eq 3 ] && scontrol requeue $SLURM_JOB_ID' USR1
        wait $PID
        """))
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="31337")
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    fold = roots / "Dataset900_Phantoms" / f"{trainer}__nnsslPlans__onemmiso" / "fold_all"
    start = time.monotonic()
    while not (fold / "checkpoint_latest.pth").exists():
        assert job.poll() is None and time.monotonic() - start < 120, job.communicate()[0]
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    output = job.communicate(timeout=120)[0]
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "31337"], output
    step = torch.load(fold / "checkpoint_latest.pth", weights_only=True)["step"]
    assert 0 < step < 100 and not (fold / "checkpoint_final.pth").exists() and not (fold / LOCK_NAME).exists()

"""What a cluster job needs besides DDP: a process group from plain `srun`, and a lock so two
runs never write the same output folder.

- `srun --ntasks-per-node=4 nnssl_train ...` (no torchrun) starts 4 processes that SLURM numbers
  (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID); `slurm_environment` turns that into the
  RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT that torchrun would set, with the
  first host of SLURM_JOB_NODELIST as master and a port derived from the job id (every task
  computes the same one).
- `RunLock`: rank 0 creates `fold_all/.nnssl_run.lock` atomically (O_EXCL) with who holds it
  (host, pid, SLURM job, start time); a background thread refreshes its time stamp every
  `HEARTBEAT_S` while the process lives, and it is removed when the run ends in any way but a
  hard kill. A second run of the same folder is refused with the holder's description. A lock
  is stale, and is taken over with a warning, when its process is gone (same host) or it was
  not refreshed for `STALE_AFTER_S` (another host: a job killed with SIGKILL cannot release it).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

from nnssl.errors import NnsslError
from nnssl.log import get_logger

logger = get_logger(__name__)

LOCK_NAME = ".nnssl_run.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 5 * HEARTBEAT_S


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[03-05,9],cpu1` -> `gpu03`, `node7` -> `node7`."""
    head = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise NnsslError(f"cannot read the SLURM node list {nodelist!r}; set MASTER_ADDR yourself")
    prefix, ranges = head.group(1), head.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_environment(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """torchrun's variables for a plain multi-task `srun` launch, or None when this is not one
    (no SLURM, a single task, or torchrun already set RANK / WORLD_SIZE)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env or "WORLD_SIZE" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return None
    job = int(env.get("SLURM_JOB_ID", "0"))
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            "MASTER_PORT": env.get("MASTER_PORT") or str(15000 + job % 20000)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive ownership of a run's output folder (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.held = False
        self._stop = threading.Event()

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict[str, Any]) -> str | None:
        age = time.time() - self.path.stat().st_mtime
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} on this host is gone"
        if age > STALE_AFTER_S:
            return f"it was last refreshed {age / 60:.0f} min ago"
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                reason = self._stale(holder)
                if reason is None:
                    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
                    raise NnsslError(
                        f"another run is writing {self.path.parent} (pid {holder.get('pid')} on "
                        f"{holder.get('host')}{job}, started {holder.get('started')}); two runs must not share an "
                        f"output folder. Wait for it, stop it, or delete {self.path} if it is certainly gone") from None
                logger.warning("taking over the stale lock %s (%s): %s", self.path, reason, holder)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            threading.Thread(target=self._heartbeat, name="nnssl-run-lock", daemon=True).start()
            return
        raise NnsslError(f"could not take the lock {self.path}; another run took it at the same moment")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # the folder vanished: nothing left to protect
                return

    def release(self) -> None:
        self._stop.set()
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

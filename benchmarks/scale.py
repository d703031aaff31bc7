"""Scale benchmark: what grows with the number of cases, from pretrain_data.json to the loader's
workers, on a synthetic OpenMind-shaped collection of tiny volumes. One JSON object on stdout.

The volumes are ~16³ voxels (a few kB each): what matters at 100k cases is the number of files,
JSON entries and Python objects, not voxels. For each collection size (default 1k, 10k, `--cases`
and twice that, the last listing every image twice under renamed dataset keys) it measures, each
stage in a fresh process so its peak memory is its own:

- `collection`: `Collection.load` + `validate` (one stat per path): seconds and peak memory;
- `fingerprint`: the header-only fingerprint (seconds per 1000 images) and planning;
- `preprocess`: one `-part K -total_parts N` shard process of a collection of that size (its cases
  already complete: what the process holds, and its merge);
- `merge`: `pretrain_data__onemmiso.json` rebuilt from what is complete on disk;
- `loader`: `load_cases`, the split (drawn and read back), `split_cases`, the loader's start-up,
  the case index's memory in the training process, and the RSS / PSS / USS of each loader worker
  after start-up and after every case was drawn once; the same for a list of `CaseRecord`s (what
  the loader held before the index) as a control;

and the real preprocessing of the `--cases` collection as the cluster pattern: `--parts` shard
processes of `nnssl_preprocess -part K -total_parts N`, `--parallel` at a time, each shard's report,
then the merge. `memory_per_case_kb` gives, per stage, the growth of the peak (and of what workers
hold) per additional case between the smallest and the largest size.

    python benchmarks/scale.py --workdir /tmp --out scale_50k.json  # 50k cases: 16 min on 2 busy cores
    python benchmarks/scale.py --quick                               # 300 cases, in one process (~20 s)

Everything is written under a new folder in `--workdir` (about 2 GB at 50k cases) and deleted at the
end (`--keep` keeps it; deleting takes ~10 min at 50k cases, so `--out` is written before).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STAGE_ORDER = ("collection", "fingerprint", "preprocess", "merge", "loader")
DISK_PER_CASE = 40_000  # bytes: raw files + preprocessed arrays and JSON, 4 kB blocks, with margin


def _log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


class Runner:
    """Runs a stage in a fresh process (or here, with `--quick`) and keeps the children's logs."""

    def __init__(self, work: Path, in_process: bool) -> None:
        self.work, self.in_process = work, in_process
        self.env = dict(os.environ, OMP_NUM_THREADS="1",
                        PYTHONPATH=os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]))

    def stage(self, name: str, **kwargs: Any) -> dict[str, Any]:
        kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
        start = time.perf_counter()
        if self.in_process:
            from _scale_stages import run_stage

            result = run_stage(name, kwargs)
        else:
            log = self.work / "logs" / f"{name}_{kwargs.get('size')}.log"
            log.parent.mkdir(exist_ok=True)
            with open(log, "w") as err:
                request = json.dumps({"name": name, "kwargs": kwargs})
                proc = subprocess.run([sys.executable, __file__, "--_stage", request],
                                      stdout=subprocess.PIPE, stderr=err, text=True, env=self.env)
            if proc.returncode != 0:
                raise RuntimeError(f"stage {name} {kwargs} failed (exit {proc.returncode}):\n"
                                   + log.read_text()[-3000:])
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        _log(f"{name} {kwargs.get('size')}: {time.perf_counter() - start:.1f} s")
        return result


def _shards(runner: Runner, dataset_id: int, parts: int, parallel: int, pre: Path) -> dict[str, Any]:
    """`nnssl_preprocess -part K -total_parts N` as separate processes, `parallel` at a time."""
    code = "import sys; from nnssl.cli.preprocess import preprocess_main; sys.exit(preprocess_main(sys.argv[1:]))"
    pending, running, shards = list(range(parts)), {}, []
    start = time.perf_counter()
    while pending or running:
        while pending and len(running) < parallel:
            part = pending.pop(0)
            log = open(runner.work / "logs" / f"shard_{part}.log", "w")
            cmd = [sys.executable, "-c", code, "-d", str(dataset_id), "-c", "onemmiso", "-np", "1",
                   "-part", str(part), "-total_parts", str(parts)]
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=runner.env)
            running[proc.pid] = (part, proc, log, time.perf_counter())
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        part, proc, log, t0 = running.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.close()
        if proc.returncode != 0:
            raise RuntimeError(f"shard {part} failed:\n" + Path(log.name).read_text()[-3000:])
        report = json.loads((pre / f"preprocessing_report_part{part}of{parts}__onemmiso.json").read_text())
        report.pop("failures")
        report.pop("anatomy_masks_marking_background_examples")
        shards.append({"part": part, "wall_s": round(time.perf_counter() - t0, 1),
                       "ru_maxrss_mb": round(usage.ru_maxrss / 1024, 1), "report": report})
        _log(f"shard {part}/{parts}: {shards[-1]['wall_s']} s, {report['done']} done, {report['failed']} failed")
    wall = time.perf_counter() - start
    merged = json.loads((pre / "pretrain_data__onemmiso.json").read_text())
    listed = sum(len(s["images"]) for d in merged["datasets"].values() for sub in d["subjects"].values()
                 for s in sub["sessions"].values())
    done = sum(s["report"]["done"] for s in shards)
    return {"parts": parts, "parallel": parallel, "wall_s": round(wall, 1),
            "cases_per_s": round(done / wall, 1), "shards": sorted(shards, key=lambda s: s["part"]),
            "merged_collection_lists": listed}


def _slope(rows: dict[int, dict[str, Any]], key: tuple[str, ...]) -> float | None:
    """kB per additional case of the value at `key`, between the smallest and largest size."""
    def get(row: Any) -> Any:
        for k in key:
            if isinstance(row, dict):
                row = row.get(k)
            elif isinstance(row, list) and isinstance(k, int) and -len(row) <= k < len(row):
                row = row[k]
            else:
                return None
        return row
    sizes = sorted(rows)
    lo, hi = get(rows[sizes[0]]), get(rows[sizes[-1]])
    if lo is None or hi is None or sizes[-1] == sizes[0]:
        return None
    return round(1024 * (hi - lo) / (sizes[-1] - sizes[0]), 3)


def memory_per_case(stages: dict[str, dict[int, dict[str, Any]]]) -> dict[str, float | None]:
    out = {f"{name}_peak_growth": _slope(rows, ("peak_growth_mb",)) for name, rows in stages.items()
           if name != "loader"}
    out["collection_held"] = _slope(stages["collection"], ("held_mb",))
    out["fingerprint_plan_peak_growth"] = _slope(stages["fingerprint"], ("plan", "peak_growth_mb"))
    loader = stages["loader"]
    out["loader_index_peak_growth"] = _slope(loader, ("index", "peak_growth_mb"))
    out["loader_index_held"] = _slope(loader, ("index", "held_mb"))
    out["loader_parent_growth_for_loader"] = _slope(loader, ("parent_growth_for_loader_mb",))
    for measure in ("uss_mb", "pss_mb", "rss_mb"):
        out[f"worker_after_startup_{measure[:-3]}"] = _slope(loader, ("workers_after_startup", 0, measure))
        for state in ("every_case_drawn", "every_case_drawn_and_full_gc"):
            out[f"worker_after_{state}_{measure[:-3]}"] = _slope(loader, ("worker_after_long_run", state, measure))
            out[f"unfrozen_worker_after_{state}_{measure[:-3]}"] = _slope(
                loader, ("worker_after_long_run_without_gc_freeze", state, measure))
            out[f"list_control_worker_after_{state}_{measure[:-3]}"] = _slope(
                loader, ("list_of_records_control", "worker_after_long_run", state, measure))
    out["loader_index_arrays"] = _slope(loader, ("index", "arrays_mb"))
    out["list_control_allocated"] = _slope(loader, ("list_of_records_control", "allocated_mb"))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from nnssl.io_utils import write_json

    base_dir = Path(args.workdir)
    base_dir.mkdir(parents=True, exist_ok=True)
    need = DISK_PER_CASE * args.cases
    free = shutil.disk_usage(base_dir).free
    if free < 2 * need:
        raise SystemExit(f"{base_dir}: {free / 1e9:.1f} GB free, {2 * need / 1e9:.1f} GB wanted for {args.cases} "
                         "cases; pass another --workdir or fewer --cases")
    work = Path(tempfile.mkdtemp(prefix="scale-", dir=base_dir))
    try:
        result = _run(args, work)
        if args.out:  # before the clean-up, which takes minutes at 50k cases
            write_json(args.out, result)
        return result
    finally:
        if args.keep:
            _log(f"kept {work}")
        else:
            _log(f"deleting {work} (minutes at 50k cases)")
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    for name in ("nnssl_raw", "nnssl_preprocessed", "nnssl_results"):
        os.environ[name] = str(work / name)
        (work / name).mkdir()
    (work / "logs").mkdir()
    raw, pre = work / "nnssl_raw", work / "nnssl_preprocessed"
    sizes = sorted(set(args.sizes))
    if args.cases not in sizes:
        raise SystemExit(f"--sizes {sizes} must include --cases {args.cases} (the collection that is preprocessed)")
    names = {size: (900 + i, f"Dataset{900 + i}_Scale{size}") for i, size in enumerate(sizes)}
    base_id, base = names[args.cases]
    from _scale_tree import disk_usage_mb, link_preprocessed, write_resized, write_tree

    start = time.perf_counter()
    tree = write_tree(raw / base / "openmind", args.cases)
    from nnssl.data.openmind import create_openmind_dataset

    base_json, _, _ = create_openmind_dataset(raw / base / "openmind", base_id, base.split("_", 1)[1])
    for size, (index, name) in names.items():
        if name != base:
            write_resized(base_json, raw / name / "pretrain_data.json", size, name, index)
    generate = {"seconds": round(time.perf_counter() - start, 1), "raw_files": tree["files"],
                "raw_file_bytes_mean": round(tree["bytes"] / max(1, tree["files"])),
                "raw_disk_mb": disk_usage_mb(raw)}
    _log(f"generated {args.cases} images ({tree['files']} files) in {generate['seconds']} s")

    runner = Runner(work, in_process=args.quick)
    stages: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in STAGE_ORDER}
    for size, (_, name) in names.items():
        stages["collection"][size] = runner.stage("collection", path=raw / name / "pretrain_data.json", size=size)
    for size, (_, name) in names.items():
        stages["fingerprint"][size] = runner.stage("fingerprint", dataset=name, size=size)
    plans = pre / base / "nnsslPlans.json"
    for _, name in names.values():  # one plan for all sizes: same plan hash, so linked cases count as complete
        if name != base:
            shutil.copy(plans, pre / name / "nnsslPlans.json")

    sharded = _shards(runner, base_id, args.parts, args.parallel, pre / base)
    sharded["preprocessed_disk_mb"] = disk_usage_mb(pre / base)
    out_root = "nnsslPlans_onemmiso"
    for _, name in names.values():
        if name != base:
            link_preprocessed(pre / base / out_root / base, pre / name / out_root / name,
                              raw / name / "pretrain_data.json")
    for size, (_, name) in names.items():
        total_parts = max(1, size // args.cases_per_shard)
        stages["preprocess"][size] = runner.stage("preprocess", dataset=name, size=size, part=total_parts - 1,
                                                  total_parts=total_parts)
    for size, (_, name) in names.items():
        stages["merge"][size] = runner.stage("merge", dataset=name, size=size)
    for size, (_, name) in names.items():
        stages["loader"][size] = runner.stage("loader", collection_path=pre / name / "pretrain_data__onemmiso.json",
                                              size=size, num_workers=args.workers, batches=args.batches,
                                              patch=args.patch)
    return {"benchmark": "scale", "quick": args.quick, "cases": args.cases, "sizes": sizes,
            "stages_in_fresh_processes": not args.quick, "cpus": os.cpu_count(), "generate": generate,
            "sharded_preprocessing": sharded,
            "stages": {name: {str(size): row for size, row in rows.items()} for name, rows in stages.items()},
            "memory_per_case_kb": memory_per_case(stages)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50_000, help="images of the generated collection")
    parser.add_argument("--sizes", type=int, nargs="+", help="collection sizes measured "
                        "(default: 1000 10000 CASES 2*CASES; sizes above CASES repeat its images)")
    parser.add_argument("--parts", type=int, default=4, help="shards of the real preprocessing run")
    parser.add_argument("--parallel", type=int, default=2, help="shard processes at a time")
    parser.add_argument("--cases_per_shard", type=int, default=250,
                        help="cases per shard in the per-size preprocess stage (total_parts = size / this)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--batches", type=int, default=20, help="batches drawn after the loader's first")
    parser.add_argument("--patch", type=int, default=32, help="patch side of the loader's batches")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the run's folder is made")
    parser.add_argument("--keep", action="store_true", help="keep the generated folder")
    parser.add_argument("--quick", action="store_true", help="300 cases, every stage in this process")
    parser.add_argument("--out", help="also write the JSON to this file")
    parser.add_argument("--_stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args._stage:
        from _scale_stages import main_child

        main_child(args._stage)
        return
    if args.quick:
        args.cases, args.sizes = 300, args.sizes or [100, 300, 600]
        args.cases_per_shard, args.parts, args.batches = 50, 2, 4
    args.sizes = args.sizes or [1000, 10_000, args.cases, 2 * args.cases]
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()

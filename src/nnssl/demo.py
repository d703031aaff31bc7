"""The end-to-end demo behind `bash run.sh demo` / `nnssl_demo`.

It runs the pipeline as far as it exists on generated phantoms, in a folder it names, so a
newcomer sees every stage produce its files without any data of their own. Each stage calls
the same library function the corresponding command uses.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nnssl import paths
from nnssl.log import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    folder: Path = Path("nnssl_demo")
    dataset_id: int = 900
    dataset_name: str = "Phantoms"
    num_volumes: int = 24
    shape: tuple[int, int, int] = (48, 48, 48)
    seed: int = 0
    num_processes: int = 2
    overwrite: bool = True

    def __post_init__(self) -> None:
        if self.num_volumes < 6:
            raise ValueError("num_volumes must be at least 6 (train and validation subjects)")
        if any(s < 16 for s in self.shape):
            raise ValueError(f"shape {self.shape}: every side must be at least 16 voxels")


@dataclass
class DemoResult:
    roots: dict[str, Path]
    dataset: str
    stages: list[tuple[str, float, str]] = field(default_factory=list)  # (stage, seconds, summary)

    def format(self) -> str:
        lines = [f"nnssl demo: dataset {self.dataset}"]
        for name, seconds, summary in self.stages:
            lines.append(f"  [{seconds:6.1f} s] {name}: {summary}")
        lines.append("Folders (export these to keep working with the demo data):")
        lines += [f"  export {k}={v}" for k, v in self.roots.items()]
        return "\n".join(lines)


def _use_demo_roots(folder: Path) -> dict[str, Path]:
    """Point the three nnssl roots at sub-folders of the demo folder (this process only)."""
    roots = {}
    for var in paths.ROOT_VARIABLES:
        root = (folder / var).resolve()
        root.mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(root)
        roots[var] = root
    return roots


def _timed(result: DemoResult, name: str, fn: Callable[[], str]) -> None:
    logger.info("demo: %s ...", name)
    start = time.perf_counter()
    summary = fn()
    result.stages.append((name, time.perf_counter() - start, summary))
    logger.info("demo: %s done: %s", name, summary)


def run_demo(config: DemoConfig) -> DemoResult:
    """Generate phantoms, build and verify the dataset, fingerprint, plan and preprocess it."""
    from nnssl.data.builders import create_dataset
    from nnssl.data.integrity import verify_collection
    from nnssl.data.phantoms import PhantomConfig, write_phantom_collection

    roots = _use_demo_roots(config.folder)
    dataset = paths.dataset_folder_name(config.dataset_id, config.dataset_name)
    result = DemoResult(roots=roots, dataset=dataset)
    phantom_dir = roots[paths.RAW] / dataset / "bids"

    def phantoms() -> str:
        manifest = write_phantom_collection(
            phantom_dir,
            PhantomConfig(num_volumes=config.num_volumes, shape=config.shape, seed=config.seed),
            num_processes=config.num_processes,
        )
        return f"{len(manifest.cases)} volumes in {phantom_dir}"

    collection_holder = {}

    def build() -> str:
        path, collection = create_dataset(
            phantom_dir, config.dataset_id, config.dataset_name, layout="bids",
            overwrite=config.overwrite,
        )
        collection_holder["c"] = collection
        s = collection.summary()
        modalities = ", ".join(f"{k}: {v}" for k, v in s["modalities"].items())
        return f"{path} ({s['subjects']} subjects, {s['images']} images; {modalities})"

    def verify() -> str:
        report = verify_collection(collection_holder["c"], num_processes=config.num_processes)
        if not report.ok:
            raise RuntimeError("demo data failed the integrity check:\n" + report.format_table())
        return f"{report.num_checked} images checked, no problems"

    _timed(result, "generate phantoms", phantoms)
    _timed(result, "create dataset", build)
    _timed(result, "verify dataset integrity", verify)

    def preprocess() -> str:
        from nnssl.preprocessing.runner import plan_and_preprocess

        outcomes = plan_and_preprocess([dataset], configurations=("onemmiso",),
                                       num_processes=config.num_processes,
                                       num_processes_fingerprint=config.num_processes)
        failed = [f for o in outcomes for f in o.failures]
        if failed:
            raise RuntimeError(f"demo preprocessing failed for {len(failed)} cases: {failed[:3]}")
        return "; ".join(str(o) for o in outcomes) + f" -> {roots[paths.PREPROCESSED] / dataset}"

    _timed(result, "plan and preprocess", preprocess)
    return result

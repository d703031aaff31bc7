"""`pretrain_data__<config>.json`: the collection rebuilt from the cases complete on disk.

Every part of a sharded run (`-part K -total_parts N`) rebuilds it at its end from the whole
collection, so whichever part finishes last leaves a complete file and no part needs to know
about the others. That makes the rebuild cost O(cases) for every part, so it is kept cheap per
case:
- each case's completion check (its properties JSON and every array it lists, the rule of
  `storage.complete_arrays`) runs in the part's worker processes, in batches;
- paths are strings under one portable prefix, not a `Path` and a `portable_path` per file;
- the output is the collection's `to_dict()` edited in place and written once, not a second
  `Collection` built, converted back to a dict and parsed again to be checked.
benchmarks/scale.py measures it (documentation/benchmarks.md has the numbers).

Parts that finish together take turns (an exclusive `flock` on `.pretrain_data__<config>.json.lock`
next to the file, held from the scan to the rename). Without it, a part whose scan started
before another part's last cases were complete could rename its file after that part's, and the
cases would be missing from the final file. With it, every part scans after the earlier merges
wrote, so the last merge lists every case that any part completed. On a file system without
locks a warning says so; re-running any one part after all have finished rebuilds the file.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nnssl.data.collection import Collection, portable_path, write_collection_dict
from nnssl.data.imageio import image_stem
from nnssl.log import get_logger
from nnssl.planning.plans import Plans
from nnssl.preprocessing import storage
from nnssl.workers import imap

logger = get_logger(__name__)
CASES_PER_TASK = 256  # a check takes about a millisecond: batches keep messaging overhead small
_IMAGE, _ANON, _ANAT = 1, 2, 4  # bits of a case's flags: complete (image), and which masks it has
# in the order `AssociatedMasks.to_dict()` writes them
_MASK_BITS = (("anatomy_mask", _ANAT, storage.ANAT_SUFFIX), ("anonymization_mask", _ANON, storage.ANON_SUFFIX))


def case_relative_stem(collection: Collection, dataset_key: str, subject_id: str, session_id: str,
                       image_name: str) -> str:
    """`<collection>/<dataset>/<subject>/<session>/<image stem>`, a case's place under the
    configuration's data folder."""
    return "/".join((collection.collection_name, dataset_key, subject_id, session_id, image_stem(image_name)))


def _stems(collection: Collection) -> Iterator[str]:
    for img in collection.iter_images():
        yield case_relative_stem(collection, img.dataset_key, img.subject_id, img.session_id, img.entry.name)


def _check_batch(args: tuple[int, str, str, list[str]]) -> tuple[int, bytes]:
    """(batch index, one flag byte per case) for the stems of one batch, in a worker."""
    index, root, plan_hash, stems = args
    flags = bytearray(len(stems))
    for i, stem in enumerate(stems):
        arrays = storage.complete_arrays(storage.CaseFiles.for_stem(Path(root, stem)), plan_hash)
        if arrays is not None:
            flags[i] = _IMAGE | sum(bit for key, bit, _ in _MASK_BITS if key in arrays)
    return index, bytes(flags)


def _batches(collection: Collection, root: str, plan_hash: str) -> Iterator[tuple[int, str, str, list[str]]]:
    batch: list[str] = []
    index = 0
    for stem in _stems(collection):
        batch.append(stem)
        if len(batch) == CASES_PER_TASK:
            yield index, root, plan_hash, batch
            index, batch = index + 1, []
    if batch:
        yield index, root, plan_hash, batch


def case_flags(collection: Collection, plan_hash: str, output_root: Path, num_processes: int = 1) -> bytes:
    """One byte per image of `collection` (file order): 0 when its case is not complete under
    `output_root`, else `_IMAGE` plus the bits of the masks it has."""
    done: dict[int, bytes] = {}
    for index, flags in imap(_check_batch, _batches(collection, str(output_root), plan_hash), num_processes,
                             describe=lambda job: f"the cases from {job[3][0]}"):
        done[index] = flags
    return b"".join(done[i] for i in range(len(done)))


def lock_path(destination: Path) -> Path:
    return destination.with_name(f".{destination.name}.lock")


@contextmanager
def _one_merge_at_a_time(destination: Path) -> Iterator[None]:
    """Hold the exclusive lock of `destination`'s merge (see the module docstring). The kernel
    releases it when the process ends, so a killed part never leaves it held."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(destination), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            locked = True
        except OSError as e:
            locked = False
            logger.warning("%s: cannot lock %s (%s); if parts of this run finish at the same time, re-run any "
                           "one part after all have finished so the file lists every case",
                           destination, lock.name, e)
        try:
            yield
        finally:
            if locked:
                fcntl.flock(lock, fcntl.LOCK_UN)


def write_preprocessed_collection(collection: Collection, plans: Plans, configuration: str, output_root: Path,
                                  destination: Path, num_processes: int = 1) -> int:
    """`pretrain_data__<config>.json` listing the complete cases, paths pointing at the arrays;
    returns how many it lists. `num_processes` workers check the cases."""
    with _one_merge_at_a_time(Path(destination)):
        return _write(collection, plans, configuration, Path(output_root), Path(destination), num_processes)


def _write(collection: Collection, plans: Plans, configuration: str, output_root: Path, destination: Path,
           num_processes: int) -> int:
    flags = case_flags(collection, plans.plan_hash(configuration), Path(output_root), num_processes)
    prefix = portable_path(Path(output_root))
    data = collection.to_dict()
    stems = _stems(collection)
    position = count = 0
    for dataset in data["datasets"].values():
        for subject in dataset["subjects"].values():
            for session in subject["sessions"].values():
                kept = []
                for image in session["images"]:
                    stem, flag = next(stems), flags[position]
                    position += 1
                    if not flag:
                        continue
                    base = f"{prefix}/{stem}"
                    image["image_path"] = base + storage.IMAGE_SUFFIX
                    # the preprocessed masks replace the raw ones (and their markers, e.g. OpenMind's
                    # inversion, already applied), so the object is new
                    image["associated_masks"] = {key: base + suffix if flag & bit else None
                                                 for key, bit, suffix in _MASK_BITS}
                    kept.append(image)
                    count += 1
                session["images"] = kept
    write_collection_dict(data, destination, portable=False)
    return count

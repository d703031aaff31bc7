"""The three environment roots and `DatasetXXX_Name` resolution.

Roots are read from the environment each time they are asked for (never at import), so a
test or a long-running process can change them, and an unset variable is reported only by
the command that actually needs it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from nnssl.errors import AmbiguousDataset, DatasetNotFound, MissingEnvironmentVariable, NnsslError

RAW = "nnssl_raw"
PREPROCESSED = "nnssl_preprocessed"
RESULTS = "nnssl_results"
ROOT_VARIABLES = (RAW, PREPROCESSED, RESULTS)

_PURPOSE = {
    RAW: "root of the raw datasets holding DatasetXXX_Name/pretrain_data.json",
    PREPROCESSED: "where nnssl_plan_and_preprocess writes plans and blosc2 arrays",
    RESULTS: "where nnssl_train writes checkpoints and logs",
}

DATASET_FOLDER_RE = re.compile(r"^Dataset(\d{3})_(.+)$")


def env_root(name: str) -> Path:
    """Return the folder named by environment variable `name`, or raise naming the fix."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        raise MissingEnvironmentVariable(name, _PURPOSE.get(name, ""))
    return Path(value).expanduser()


def nnssl_raw() -> Path:
    return env_root(RAW)


def nnssl_preprocessed() -> Path:
    return env_root(PREPROCESSED)


def nnssl_results() -> Path:
    return env_root(RESULTS)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """`DatasetXXX_Name` for a numeric id and a short name."""
    if not 0 <= int(dataset_id) <= 999:
        raise NnsslError(f"dataset id must be between 0 and 999, got {dataset_id}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise NnsslError(
            f"dataset name {name!r} must start with a letter or digit and contain only "
            "letters, digits, '_' and '-'"
        )
    return f"Dataset{int(dataset_id):03d}_{name}"


def parse_dataset_folder_name(folder_name: str) -> tuple[int, str] | None:
    """(id, name) of a `DatasetXXX_Name` folder name, or None if it is not one."""
    m = DATASET_FOLDER_RE.match(folder_name)
    return (int(m.group(1)), m.group(2)) if m else None


def _candidates(roots: list[Path]) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for child in sorted(root.iterdir()):
            if child.is_dir() and DATASET_FOLDER_RE.match(child.name):
                found.setdefault(child.name, []).append(child)
    return found


def resolve_dataset_name(dataset: str | int, roots: tuple[str, ...] = ROOT_VARIABLES) -> str:
    """Turn `745`, `"745"`, `"Dataset745_OpenNeuro"` into the full folder name.

    Looks in every root whose environment variable is set (at least one must be). A full
    name is returned as is when it is well formed, even if no folder exists yet (the
    caller will create it or report the missing file). An id must match exactly one name.
    """
    text = str(dataset).strip()
    if parse_dataset_folder_name(text):
        return text
    if not re.fullmatch(r"\d{1,3}", text):
        raise DatasetNotFound(
            f"{text!r} is neither a dataset id (e.g. 745) nor a folder name (e.g. Dataset745_OpenNeuro)"
        )
    dataset_id = int(text)
    set_roots = [env_root(r) for r in roots if os.environ.get(r)]
    if not set_roots:
        # Report the first root so the message says which variable to set.
        env_root(roots[0])
    matches = sorted(
        name for name in _candidates(set_roots) if parse_dataset_folder_name(name)[0] == dataset_id
    )
    if not matches:
        where = ", ".join(f"${r}={os.environ[r]}" for r in roots if os.environ.get(r))
        raise DatasetNotFound(
            f"no folder Dataset{dataset_id:03d}_* found in {where}. "
            "Create one with nnssl_create_dataset, or pass the full name."
        )
    if len(matches) > 1:
        raise AmbiguousDataset(
            f"dataset id {dataset_id} matches several folders: {', '.join(matches)}. "
            "Pass the full name instead of the id, or rename one of them."
        )
    return matches[0]


def list_datasets(root_variable: str) -> list[str]:
    """Names of the `DatasetXXX_Name` folders under one root, sorted."""
    return sorted(_candidates([env_root(root_variable)]))


def raw_dataset_dir(dataset: str | int) -> Path:
    return nnssl_raw() / resolve_dataset_name(dataset, (RAW,))


def preprocessed_dataset_dir(dataset: str | int) -> Path:
    return nnssl_preprocessed() / resolve_dataset_name(dataset, (PREPROCESSED, RAW))


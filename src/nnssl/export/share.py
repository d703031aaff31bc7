"""`nnssl_export`: a shareable folder from a training run.

    OUT/checkpoint_final.pth   slim: network_weights + nnssl_adaptation_plan (+ our backbone
                               description, trainer name, citations, config); no optimizer,
                               no student / predictor unless asked
    OUT/adaptation_plan.json   the plan nnU-Net reads, as JSON
    OUT/config.json            every hyperparameter of the run, the step, the data summary, and
                               `finetuning`: what nnU-Net can fine-tune it with, the pretraining
                               normalisation and which workflow matches it, the commands
    OUT/README.md              model card (front matter for model hubs, the commands)
    OUT/model.safetensors      optional: the encoder weights alone

The three files at the root are what nnU-Net's `-pc https://huggingface.co/ORG/REPO` downloads,
so the folder is a Hugging Face model repository as it is (documentation/finetuning_nnunet.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnssl.checkpoints.format import HANDSHAKE_KEYS, load_checkpoint, save_checkpoint
from nnssl.errors import NnsslError
from nnssl.export.model_card import model_card
from nnssl.export.nnunet import finetuning_commands, finetuning_support, pretraining_name
from nnssl.io_utils import atomic_path, write_json
from nnssl.log import get_logger
from nnssl.models.backbone import BackboneSpec
from nnssl.models.registry import nnunet_architecture_plans

logger = get_logger(__name__)



@dataclass
class ExportResult:
    folder: Path
    source: Path
    files: list[Path]


def find_checkpoint(source: str | Path) -> Path:
    """A checkpoint file, or the best one in a results folder (final before latest)."""
    source = Path(source)
    if source.is_file():
        return source
    for folder in (source, source / "fold_all"):
        for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
            if (folder / name).is_file():
                if name == "checkpoint_latest.pth":
                    logger.warning("%s has no checkpoint_final.pth: exporting the unfinished %s", folder, name)
                return folder / name
    raise NnsslError(f"no checkpoint_final.pth or checkpoint_latest.pth in {source} (or its fold_all/); pass a "
                     "results folder of nnssl_train or a .pth file")


def export(source: str | Path, out: str | Path, include_method_state: bool = False,
           safetensors: bool = False) -> ExportResult:
    """Write the folder (see the module docstring) from a training checkpoint or results folder."""
    checkpoint = find_checkpoint(source)
    data = load_checkpoint(checkpoint)
    missing = [k for k in ("network_weights", "nnssl_adaptation_plan") if k not in data]
    if missing:
        raise NnsslError(f"{checkpoint} lacks {missing}: not an nnssl pretraining checkpoint")
    data["nnssl_adaptation_plan"] = current_adaptation_plan(data, checkpoint)
    out = Path(out).resolve()  # the card's commands use it: nnU-Net stores -pc as given
    out.mkdir(parents=True, exist_ok=True)
    slim = {k: data[k] for k in HANDSHAKE_KEYS if k in data}
    if include_method_state and "method_state" in data:
        slim["method_state"] = data["method_state"]  # student, teacher, predictor / decoder
    files = [save_checkpoint(out / "checkpoint_final.pth", slim)]
    plan = data["nnssl_adaptation_plan"]
    write_json(out / "adaptation_plan.json", plan)
    name = pretraining_name(data.get("trainer_name"))
    config = {"trainer_name": data.get("trainer_name"), "step": data.get("step"), "epoch": data.get("epoch"),
              "training_config": data.get("training_config"), "data_summary": data.get("data_summary"),
              "final_metrics": data.get("final_metrics"), "source_checkpoint": str(checkpoint.resolve()),
              "finetuning": {**finetuning_support(plan),
                             "commands": finetuning_commands(plan, str(out / "checkpoint_final.pth"), name)}}
    write_json(out / "config.json", config)
    files += [out / "adaptation_plan.json", out / "config.json"]
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text(model_card(data, str(out)), encoding="utf-8")
    files.append(out / "README.md")
    if safetensors:
        from safetensors.torch import save_file

        with atomic_path(out / "model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in data["network_weights"].items()}, str(tmp),
                      metadata={"format": "pt", "trainer_name": str(data.get("trainer_name"))})
        files.append(out / "model.safetensors")
    logger.info("exported %s -> %s", checkpoint, out)
    return ExportResult(out, checkpoint, files)


def current_adaptation_plan(data: dict[str, Any], source: Path) -> dict[str, Any]:
    """The checkpoint's adaptation plan, its `architecture_plans` recomputed from our own
    description (`nnssl_backbone`) when the checkpoint has one: checkpoints written before the
    plan took nnU-Net master's form (full constructor kwargs, a Primus class path that nnU-Net's
    trainers cannot build) are fixed by exporting them again."""
    plan = dict(data["nnssl_adaptation_plan"])
    described = data.get("nnssl_backbone")
    if described is None:
        return plan
    current = nnunet_architecture_plans(BackboneSpec.from_dict(described))
    if plan.get("architecture_plans") != current:
        logger.info("%s: architecture_plans rewritten in nnU-Net master's form (%s -> %s)", source,
                    (plan.get("architecture_plans") or {}).get("arch_class_name"), current["arch_class_name"])
        plan["architecture_plans"] = current
    return plan

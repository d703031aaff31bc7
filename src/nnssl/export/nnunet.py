"""What nnU-Net master can do with a checkpoint, and the commands that do it.

nnU-Net master's pretrained fine-tuning (MIC-DKFZ/nnUNet; what it does is summarised in
documentation/finetuning_nnunet.md, "What nnU-Net does with it") has two workflows, and which one
works depends on the architecture the adaptation plan names:

- Workflow B (recommended): `nnUNetv2_preprocess_like_nnssl` builds the checkpoint's own architecture
  and preprocesses like the pretraining (`-am like_pretrained`: its spacing; z-score on every
  channel). `PretrainedTrainer` / `PretrainedTrainer_Primus` build only the preset names
  (PrimusS/B/M/L, ResEncL) and U-Net class paths; `PretrainedTrainer_Primusx` builds every Primus
  (presets by name, other sizes from `PrimusX` kwargs).
- Workflow A: `nnUNetv2_plan_like_dynamic` keeps an existing nnU-Net ResEnc plan and
  `DynamicPretrainedTrainer` copies what fits. The ResEnc presets (M/L/XL) all start with a
  32-channel stem, so only ResEnc-L-wide encoders load; the loader stops at a stem of another width.

`finetuning_support` writes these facts for one checkpoint (into `config.json` and the model card);
`finetuning_commands` the commands, with the absolute checkpoint path nnU-Net stores in its plans
(it checks `isfile()` when training starts, from wherever the job runs). tests/test_nnunet_client.py
runs them against nnU-Net's own code.
"""

from __future__ import annotations

import re
from typing import Any

PRIMUS_PRESETS = ("PrimusS", "PrimusB", "PrimusM", "PrimusL")
RESENC_PRESET = "ResEncL"
# nnU-Net's ResEnc presets' first stage width (nnUNetPlannerResEncM/L/XL): Workflow A's stem
NNUNET_RESENC_STEM_WIDTH = 32
ADAPTATION_MODES = ("like_pretrained", "default_nnunet")  # the guide's default first
DATASET, FOLD = "DATASET_ID", "FOLD"
# when the plans name depends on the downstream dataset (no fixed pretraining spacing)
PLANS_PLACEHOLDER = "PLANS_NAME"

_NO_DYNAMIC_PRIMUS = ("nnUNetv2_plan_like_dynamic keeps an nnU-Net CNN (ResEnc) plan for DynamicPretrainedTrainer "
                      "to load into; a Primus encoder has no counterpart in it")
_PRESETS_ONLY = ("builds only the preset names (PrimusS/B/M/L, ResEncL) and U-Net class paths: "
                 "NotImplementedError for '{name}'")


def finetuning_support(plan: dict[str, Any]) -> dict[str, Any]:
    """Which nnU-Net master workflows and trainers fine-tune the checkpoint of this adaptation
    plan, which do not and why, and how its pretraining normalisation compares (plain types)."""
    arch = plan["architecture_plans"]
    name = str(arch["arch_class_name"])
    unsupported: dict[str, str] = {}
    workflow_a: dict[str, Any]
    if name in PRIMUS_PRESETS:
        trainers = ["PretrainedTrainer_Primusx", "PretrainedTrainer_Primus"]
        workflow_a = {"supported": False, "reason": _NO_DYNAMIC_PRIMUS}
    elif name == "PrimusX" or name.endswith(".Primus"):
        trainers = ["PretrainedTrainer_Primusx"]
        for trainer in ("PretrainedTrainer", "PretrainedTrainer_Primus"):
            unsupported[trainer] = _PRESETS_ONLY.format(name=name)
        workflow_a = {"supported": False, "reason": _NO_DYNAMIC_PRIMUS}
    else:
        trainers = ["PretrainedTrainer"]
        workflow_a = _resenc_workflow_a(name, arch.get("arch_kwargs"))
    if not workflow_a["supported"]:
        unsupported["DynamicPretrainedTrainer"] = workflow_a["reason"]
    return {
        "nnunet": "MIC-DKFZ/nnUNet master (nnUNetv2_preprocess_like_nnssl, nnUNetv2_plan_like_dynamic, "
                  "nnUNetv2_train_pretrained)",
        "architecture": name,
        "workflow_b": {"supported": True, "plan_command": "nnUNetv2_preprocess_like_nnssl", "trainers": trainers,
                       "recommended_trainer": trainers[0], "adaptation_modes": list(ADAPTATION_MODES)},
        "workflow_a": workflow_a,
        "unsupported_trainers": unsupported,
        "normalization": normalization_support(plan),
    }


def _resenc_workflow_a(name: str, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    if name == RESENC_PRESET:
        return {"supported": True, "plan_command": "nnUNetv2_plan_like_dynamic", "planner": "nnUNetPlannerResEncL",
                "base_plans": "nnUNetResEncUNetLPlans", "trainer": "DynamicPretrainedTrainer"}
    stem = (kwargs or {}).get("features_per_stage", [None])[0]
    return {"supported": False, "reason": (
        f"Workflow A builds the downstream plan's ResEnc, and nnU-Net's ResEnc presets start with "
        f"{NNUNET_RESENC_STEM_WIDTH} channels; this encoder's stem has {stem}, so DynamicPretrainedTrainer's "
        "loader stops at the size mismatch (only ResEncL-sized encoders are fine-tuned this way). Use Workflow B "
        "(nnUNetv2_preprocess_like_nnssl), which builds this architecture")}


def pretraining_normalization(plan: dict[str, Any]) -> dict[str, str]:
    """Modality -> scheme the encoder was pretrained with (from the pretrain plan)."""
    pretrain = plan.get("pretrain_plan") or {}
    per_modality = pretrain.get("normalization_per_modality") or {}
    if per_modality:
        return {str(m): str(n.get("scheme", "ZScoreNormalization")) for m, n in sorted(per_modality.items())}
    config = next(iter((pretrain.get("configurations") or {}).values()), {})
    schemes = config.get("normalization_schemes") or ["ZScoreNormalization"]
    return {"all": schemes[0]} if len(set(schemes)) == 1 else {f"channel {i}": s for i, s in enumerate(schemes)}


def normalization_support(plan: dict[str, Any]) -> dict[str, Any]:
    """The pretraining normalisation and which fine-tuning workflow feeds the encoder the same."""
    used = pretraining_normalization(plan)
    ct = sorted(m for m, s in used.items() if s == "CTNormalization")
    if not ct and set(used.values()) <= {"ZScoreNormalization"}:
        return {"pretraining": used, "matches": "workflow_b", "note": (
            "Pretrained with per-image z-score on every modality. Workflow B (nnUNetv2_preprocess_like_nnssl) "
            "applies exactly this to every channel. Workflow A keeps the downstream plan's normalisation: "
            "z-score for MR and other non-CT channels (the same), but nnU-Net's CTNormalization for CT "
            "channels (clipped and z-scored with the downstream dataset's statistics), which this encoder did "
            "not see in pretraining.")}
    return {"pretraining": used, "matches": "workflow_a_for_ct", "note": (
        f"{', '.join(ct) or 'Some modalities'} were pretrained with nnU-Net's CTNormalization (clip to the "
        "pretraining dataset's 0.5/99.5 percentiles, z-score with its mean and std; the plan choice "
        "`-ct_norm CTNormalization`). Workflow A keeps the downstream plan's CTNormalization for CT channels "
        "(the same scheme, with the downstream dataset's statistics): the closer match. Workflow B z-scores "
        "every channel per image, which is not what this encoder saw for CT.")}


def plans_name_b(name: str, plan: dict[str, Any], adaptation_mode: str = "like_pretrained",
                 input_channels: int = 1) -> str | None:
    """The plans name `nnUNetv2_preprocess_like_nnssl -n NAME -am like_pretrained` writes for a
    downstream dataset with `input_channels` channels, or None when it depends on that dataset
    (its spacing: `default_nnunet`, or a pretraining without a fixed spacing)."""
    config = next(iter((plan.get("pretrain_plan") or {}).get("configurations", {}).values()), {})
    spacing = config.get("spacing")
    if adaptation_mode != "like_pretrained" or spacing is None:
        return None
    norm = "_".join("Z" for _ in range(input_channels))
    return f"ptPlans__{name}____Spacing__{'_'.join(f'{float(s):.2f}' for s in spacing)}___Norm__{norm}"


def pretraining_name(trainer_name: str | None) -> str:
    """A `-n` name for nnU-Net (it becomes part of a file name): the trainer name, sanitised."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", f"nnssl_{trainer_name or 'encoder'}").strip("_")


def finetuning_commands(plan: dict[str, Any], checkpoint: str, name: str) -> dict[str, list[str]]:
    """Shell commands per workflow, for a downstream dataset `DATASET_ID` in nnU-Net format with
    one input channel, fold `FOLD`; only workflows and trainers that work for this checkpoint.
    `checkpoint` should be absolute (nnU-Net stores it as given)."""
    support = finetuning_support(plan)
    b = support["workflow_b"]
    trainer = b["recommended_trainer"]
    plans = plans_name_b(name, plan) or PLANS_PLACEHOLDER
    commands = {"workflow_b": [
        f"nnUNetv2_extract_fingerprint -d {DATASET}",
        f"nnUNetv2_plan_experiment -d {DATASET}",
        f"nnUNetv2_preprocess_like_nnssl -d {DATASET} -n {name} -pc {checkpoint} -am like_pretrained",
        f"nnUNetv2_train_pretrained {DATASET} 3d_fullres {FOLD} -p {plans} -tr {trainer}",
    ], "from_scratch": [
        f"nnUNetv2_train_pretrained {DATASET} 3d_fullres {FOLD} -p {plans} -tr {trainer} --from_scratch",
    ]}
    a = support["workflow_a"]
    if a["supported"]:
        commands["workflow_a"] = [
            f"nnUNetv2_plan_and_preprocess -d {DATASET} -pl {a['planner']}",
            f"nnUNetv2_plan_like_dynamic -d {DATASET} -n {name} -pc {checkpoint} -pl {a['base_plans']}",
            f"nnUNetv2_train_pretrained {DATASET} 3d_fullres {FOLD} -p ptPlans_dynamic__{name} -tr {a['trainer']}",
        ]
    return commands

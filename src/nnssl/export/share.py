"""`nnssl_export`: a shareable folder from a training run.

    OUT/checkpoint_final.pth   slim: network_weights + nnssl_adaptation_plan (+ our backbone
                               description, trainer name, citations, config); no optimizer,
                               no student / predictor unless asked
    OUT/adaptation_plan.json   the plan nnU-Net reads, as JSON
    OUT/config.json            every hyperparameter of the run, the step, the data summary
    OUT/README.md              model card (front matter for model hubs)
    OUT/model.safetensors      optional: the encoder weights alone
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnssl.errors import NnsslError
from nnssl.io_utils import atomic_path, write_json
from nnssl.log import get_logger
from nnssl.training.checkpoint import load_checkpoint, save_checkpoint

logger = get_logger(__name__)

SLIM_KEYS = ("network_weights", "nnssl_adaptation_plan", "nnssl_backbone", "trainer_name", "citations",
             "training_config", "step", "epoch", "data_summary", "final_metrics")


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
    checkpoint = find_checkpoint(source)
    data = load_checkpoint(checkpoint)
    missing = [k for k in ("network_weights", "nnssl_adaptation_plan") if k not in data]
    if missing:
        raise NnsslError(f"{checkpoint} lacks {missing}: not an nnssl pretraining checkpoint")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slim = {k: data[k] for k in SLIM_KEYS if k in data}
    if include_method_state and "method_state" in data:
        slim["method_state"] = data["method_state"]  # student, teacher, predictor / decoder
    files = [save_checkpoint(out / "checkpoint_final.pth", slim)]
    write_json(out / "adaptation_plan.json", data["nnssl_adaptation_plan"])
    config = {"trainer_name": data.get("trainer_name"), "step": data.get("step"), "epoch": data.get("epoch"),
              "training_config": data.get("training_config"), "data_summary": data.get("data_summary"),
              "final_metrics": data.get("final_metrics"), "source_checkpoint": str(checkpoint.resolve())}
    write_json(out / "config.json", config)
    files += [out / "adaptation_plan.json", out / "config.json"]
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text(model_card(data), encoding="utf-8")
    files.append(out / "README.md")
    if safetensors:
        from safetensors.torch import save_file

        with atomic_path(out / "model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in data["network_weights"].items()}, str(tmp),
                      metadata={"format": "pt", "trainer_name": str(data.get("trainer_name"))})
        files.append(out / "model.safetensors")
    logger.info("exported %s -> %s", checkpoint, out)
    return ExportResult(out, checkpoint, files)


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v if not isinstance(v, (list, dict)) else json.dumps(v)} |" for k, v in rows]
    return "\n".join(lines)


def model_card(data: dict[str, Any]) -> str:
    """The README.md of an exported model: what it is, how it was made, how to fine-tune it."""
    plan = data["nnssl_adaptation_plan"]
    arch = plan["architecture_plans"]["arch_class_name"]
    cfg = data.get("training_config") or {}
    summary = data.get("data_summary") or {}
    metrics = data.get("final_metrics") or {}
    method = "I-JEPA" if str(cfg.get("method", "")).startswith("IJEPA") else "MAE"
    configuration = next(iter(plan["pretrain_plan"]["configurations"]))
    spacing = plan["pretrain_plan"]["configurations"][configuration].get("spacing")
    hyper = [(k, cfg[k]) for k in ("trainer_name", "backbone", "patch_size", "batch_size", "num_epochs",
                                   "iterations_per_epoch", "peak_lr", "start_weight_decay", "final_weight_decay",
                                   "ema_start", "ema_end", "predictor_width", "predictor_depth", "num_targets",
                                   "target_scale", "context_scale", "loss", "mae_mask_ratio") if k in cfg]
    monitors = [(k, f"{metrics[k]:.4g}") for k in ("train_loss", "val_loss", "token_rankme", "pooled_rankme",
                                                  "target_std", "pred_std", "cos_within", "cos_across") if k in metrics]
    # nnU-Net's guide: PretrainedTrainer_Primus for Primus, its default PretrainedTrainer for CNNs
    trainer_flag = " -tr PretrainedTrainer_Primus" if "Primus" in arch else ""
    cites = "\n".join(f"- **{c['name']}** ({c['type']}): " + " ".join(c["apa_citations"])
                      for c in data.get("citations") or [])
    return f"""---
license: cc-by-4.0
tags:
- medical
- 3d
- self-supervised
- nnssl
- {method.lower()}
pipeline_tag: image-feature-extraction
library_name: nnssl
---

# {data.get('trainer_name', 'nnssl encoder')} ({arch})

A 3D encoder pretrained with **{method}** by nnssl. `checkpoint_final.pth` holds `network_weights`
({'the EMA target encoder' if method == 'I-JEPA' else 'the encoder'}, keyed as the downstream network
names them) and `nnssl_adaptation_plan`; it fine-tunes in nnU-Net's pretrained-weights workflow without
conversion and loads with `torch.load(path, weights_only=True)`.

## Model
- architecture: `{arch}`; encoder keys `{plan['key_to_encoder']}*`, stem `{plan['key_to_stem']}*`,
  learned position embedding: `{plan.get('key_to_lpe')}`
- input: {plan['pretrain_num_input_channels']} channel(s), patch {plan['recommended_downstream_patchsize']}
  voxels at spacing {spacing} ({configuration})
- trained for {data.get('step')} optimizer steps ({data.get('epoch')} epochs)

## Pretraining data
- dataset: {summary.get('dataset', 'unknown')}; {summary.get('num_train_images', '?')} training and
  {summary.get('num_val_images', '?')} validation images of {summary.get('num_subjects', '?')} subjects
- modalities: {', '.join(summary.get('modalities') or []) or 'unknown'}; normalisation per modality as in
  `adaptation_plan.json` (`pretrain_plan`)

## Method and hyperparameters
{_table(hyper)}

All settings are in `config.json`.

## Training curve and collapse monitors (last logged values)
{_table(monitors) if monitors else 'not recorded'}

Healthy I-JEPA runs keep `target_std` well above 0.05, token RankMe above 5% of the width and the
cross-volume cosine below 0.95 (see nnssl's documentation, "collapse monitors").

## Fine-tune with nnU-Net
With the nnssl-aware nnU-Net (github.com/TaWald/nnUNet, to be merged into nnU-Net), on a downstream
dataset in nnU-Net format:
```bash
nnUNetv2_preprocess_like_nnssl -d DATASET_ID -n NAME -pc checkpoint_final.pth -am like_pretrained
# -p: the plans name the previous command wrote (ptPlans__NAME__...)
nnUNetv2_train_pretrained DATASET_ID 3d_fullres FOLD -p PLANS_NAME{trainer_flag}
```
The encoder and stem load strictly; the in-projection is repeated for more input channels and the
position embedding (Primus) is interpolated when the downstream patch size differs.

## Citations
{cites}
"""

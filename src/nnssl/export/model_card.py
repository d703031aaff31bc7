"""The model card (`README.md`) of an exported folder: a Hugging Face model repository's front page.

It states what the checkpoint is, how it was made, and how to fine-tune it in nnU-Net master with
commands that work for *this* checkpoint (`nnssl.export.nnunet`): only the workflows and
trainers nnU-Net can build it with, the absolute checkpoint path, and why the others do not apply.
"""

from __future__ import annotations

import json
from typing import Any

from nnssl.export.nnunet import PLANS_PLACEHOLDER, finetuning_commands, finetuning_support, pretraining_name

_WORKFLOW_NAMES = {"workflow_b": "Workflow B (recommended): adapt nnU-Net to the checkpoint",
                   "workflow_a": "Workflow A: keep nnU-Net's ResEnc-L plan"}


def _table(rows: list[tuple[str, Any]]) -> str:
    lines = ["| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v if not isinstance(v, (list, dict)) else json.dumps(v)} |" for k, v in rows]
    return "\n".join(lines)


def _family(arch: str) -> str | None:
    """A hub tag for the architecture family nnU-Net builds (None: no family tag)."""
    if "ResEnc" in arch or "ResidualEncoder" in arch:
        return "resenc"
    return "primus" if arch.startswith("Primus") or arch.endswith(".Primus") else None


def front_matter(method: str, arch: str) -> str:
    """Hub metadata: license, library, tags (method, family, architecture), base architecture."""
    tags = [t for t in ("medical", "3d", "self-supervised", "nnssl", "nnunet", method.lower().replace("-", ""),
                        _family(arch), arch.rsplit(".", 1)[-1]) if t]
    return "\n".join(["---", "license: cc-by-4.0", "library_name: nnssl", "pipeline_tag: image-feature-extraction",
                      f"base_architecture: {arch.rsplit('.', 1)[-1]}", "tags:", *[f"- {t}" for t in tags], "---"])


def _finetuning_section(plan: dict[str, Any], checkpoint: str, name: str) -> str:
    support = finetuning_support(plan)
    commands = finetuning_commands(plan, checkpoint, name)
    b, a = support["workflow_b"], support["workflow_a"]
    rows = [f"| Workflow B (`{b['plan_command']}`) | {', '.join(f'`{t}`' for t in b['trainers'])} |"]
    rows.append(f"| Workflow A (`nnUNetv2_plan_like_dynamic`) | `{a['trainer']}` on `{a['base_plans']}` |"
                if a["supported"] else f"| Workflow A (`nnUNetv2_plan_like_dynamic`) | not supported: {a['reason']} |")
    rows += [f"| `-tr {t}` | not supported: {why} |" for t, why in support["unsupported_trainers"].items()
             if t != "DynamicPretrainedTrainer"]
    parts = [
        "## Fine-tune with nnU-Net",
        "nnU-Net master (github.com/MIC-DKFZ/nnUNet) has the pretrained fine-tuning built in "
        "(`nnUNetv2_preprocess_like_nnssl`, `nnUNetv2_plan_like_dynamic`, `nnUNetv2_train_pretrained`; its guide is "
        "`documentation/finetuning_from_nnssl_checkpoints.md`). Install it from a clone (`pip install -e .`); "
        "PyPI's nnunetv2 2.8.1 predates it. What works for this checkpoint "
        f"(`{support['architecture']}`):",
        "", "| workflow / trainer | |", "|---|---|", *rows, "",
        f"### {_WORKFLOW_NAMES['workflow_b']}",
        "For a downstream dataset `DATASET_ID` in nnU-Net format (`$nnUNet_raw`), fold `FOLD`: nnU-Net's own "
        "fingerprint and base plan first, then the plan adapted to this checkpoint (its architecture, its "
        "pretraining spacing with `-am like_pretrained`, z-score on every channel), then training. `-pc` is "
        "this folder's absolute path on the machine that exported it (nnU-Net stores it in the plans and checks "
        "it when training starts); from a published copy, pass the repository URL instead (see Publish).",
        "```bash", *commands["workflow_b"], "```",
        ("The `-p` name above is for a one-channel dataset (`Norm__Z_Z` for two channels, and so on); "
         "`nnUNetv2_preprocess_like_nnssl` writes it to `$nnUNet_preprocessed/DatasetXXX_Name/`." if
         PLANS_PLACEHOLDER not in commands["workflow_b"][-1] else
         f"Replace `{PLANS_PLACEHOLDER}` with the `ptPlans__{name}____...` name `nnUNetv2_preprocess_like_nnssl` "
         "writes to `$nnUNet_preprocessed/DatasetXXX_Name/` (the pretraining had no fixed spacing, so it "
         "depends on the dataset)."),
        "`-am default_nnunet` keeps nnU-Net's spacing for the dataset instead (better when the data is much finer "
        "than the pretraining spacing; the `-p` name then carries that spacing).",
        "",
        "**Baseline.** The same plan and trainer without the pretrained weights, for a fair comparison:",
        "```bash", *commands["from_scratch"], "```",
    ]
    if "workflow_a" in commands:
        parts += ["", f"### {_WORKFLOW_NAMES['workflow_a']}",
                  "Keeps nnU-Net's own ResEnc-L plan (spacing, patch size, normalisation, depth) and copies the "
                  "pretrained weights that fit:",
                  "```bash", *commands["workflow_a"], "```"]
    norm = support["normalization"]
    parts += ["", "### Normalisation",
              f"Pretraining: {', '.join(f'{m}: {s}' for m, s in norm['pretraining'].items())}. {norm['note']}"]
    return "\n".join(parts)


def _publish_section(folder: str, name: str, plan: dict[str, Any]) -> str:
    b = finetuning_support(plan)["workflow_b"]
    return "\n".join([
        "## Publish",
        "This folder is a model repository: `adaptation_plan.json`, `checkpoint_final.pth` and `config.json` at "
        "its root are what `-pc https://huggingface.co/ORG/REPO` downloads. Upload it (huggingface_hub's `hf` CLI; "
        "`huggingface-cli upload` takes the same arguments in huggingface_hub < 1.0):",
        "```bash",
        "hf auth login",
        f"hf upload ORG/REPO {folder} .",
        "```",
        "Users then pass the repository instead of a path (`nnssl_pretrained_models` is where nnU-Net keeps "
        "the download):",
        "```bash",
        "export nnssl_pretrained_models=/path/to/nnssl_pretrained_models",
        f"nnUNetv2_preprocess_like_nnssl -d DATASET_ID -n {name} -pc https://huggingface.co/ORG/REPO "
        f"-am like_pretrained",
        "```",
        f"and train with `-tr {b['recommended_trainer']}` as above.",
    ])


# the settings shown on the card (all of them are in config.json), by section
_CARD_SETTINGS = ("trainer_name", "method", "backbone", "patch_size", "batch_size", "grad_accumulation", "num_epochs",
                  "iterations_per_epoch", "optim.peak_lr", "optim.start_weight_decay", "optim.final_weight_decay",
                  "model.patch_embed_size", "model.drop_path_rate")
_METHOD_SETTINGS = {
    "IJEPATrainer": ("ijepa.ema_start", "ijepa.ema_end", "ijepa.predictor_width", "ijepa.predictor_depth",
                     "ijepa.loss", "ijepa.target_layers", "ijepa.sigreg_weight", "ijepa.vicreg_variance_weight",
                     "ijepa.vicreg_covariance_weight", "mask.num_targets", "mask.target_scale", "mask.context_scale"),
    "MAETrainer": ("mae.mask_ratio", "mae.block_size", "mae.decoder_width", "mae.decoder_depth"),
}


def _method_entry(cfg: dict[str, Any], trainer_name: str | None) -> Any:
    """The registry entry of the checkpoint's method (None for a checkpoint of an unknown one)."""
    from nnssl.methods.registry import UnknownMethod, get_method

    name = cfg.get("method") or str(trainer_name or "").split("_")[0]
    try:
        return get_method(name)
    except UnknownMethod:
        return None


def hyperparameters(cfg: dict[str, Any]) -> list[tuple[str, Any]]:
    """(setting, value) rows of the card's table from a training configuration (nested sections
    as dotted names; a configuration written before the sections existed shows what it has)."""
    from nnssl.settings import flatten

    flat = flatten(cfg)
    keys = _CARD_SETTINGS + _METHOD_SETTINGS.get(str(cfg.get("method")), ())
    return [(k, flat[k]) for k in keys if k in flat and flat[k] is not None]


def model_card(data: dict[str, Any], folder: str) -> str:
    """README.md of an export written to the absolute path `folder` (its commands use it)."""
    plan = data["nnssl_adaptation_plan"]
    arch = plan["architecture_plans"]["arch_class_name"]
    cfg = data.get("training_config") or {}
    summary = data.get("data_summary") or {}
    metrics = data.get("final_metrics") or {}
    method_entry = _method_entry(cfg, data.get("trainer_name"))
    method = method_entry.display_name if method_entry is not None else "unknown method"
    configuration = next(iter(plan["pretrain_plan"]["configurations"]))
    spacing = plan["pretrain_plan"]["configurations"][configuration].get("spacing")
    hyper = hyperparameters(cfg)
    monitors = [(k, f"{metrics[k]:.4g}") for k in ("train_loss", "val_loss", "token_rankme", "pooled_rankme",
                                                  "target_std", "pred_std", "cos_within", "cos_across") if k in metrics]
    cites = "\n".join(f"- **{c['name']}** ({c['type']}): " + " ".join(c["apa_citations"])
                      for c in data.get("citations") or [])
    norm = finetuning_support(plan)["normalization"]["pretraining"]
    name = pretraining_name(data.get("trainer_name"))
    checkpoint = f"{folder.rstrip('/')}/checkpoint_final.pth"
    return f"""{front_matter(method, arch)}

# {data.get('trainer_name', 'nnssl encoder')} ({arch})

A 3D encoder pretrained with **{method}** by nnssl. `checkpoint_final.pth` holds `network_weights`
({method_entry.exports if method_entry is not None else 'the encoder'}, keyed as the downstream network
names them) and `nnssl_adaptation_plan`; nnU-Net master fine-tunes it without conversion, and it loads
with `torch.load(path, weights_only=True)`.

## Model
- architecture: `{arch}`; encoder keys `{plan['key_to_encoder']}*`, stem `{plan['key_to_stem']}*`,
  learned position embedding: `{plan.get('key_to_lpe')}`
- input: {plan['pretrain_num_input_channels']} channel(s), patch {plan['recommended_downstream_patchsize']}
  voxels at spacing {spacing} ({configuration})
- trained for {data.get('step')} optimizer steps ({data.get('epoch')} epochs)

## Pretraining data
- dataset: {summary.get('dataset', 'unknown')}; {summary.get('num_train_images', '?')} training and
  {summary.get('num_val_images', '?')} validation images of {summary.get('num_subjects', '?')} subjects
- modalities: {', '.join(summary.get('modalities') or []) or 'unknown'}
- normalisation: {', '.join(f'{m}: {s}' for m, s in norm.items())} (see "Normalisation" below)

## Method and hyperparameters
{_table(hyper)}

All settings are in `config.json`.

## Training curve and collapse monitors (last logged values)
{_table(monitors) if monitors else 'not recorded'}

Healthy I-JEPA runs keep `target_std` well above 0.05 and token RankMe well above 20% of
min(width, token rows); nnssl's documentation (ijepa_method.md, "Collapse monitors") explains the
alarms.

{_finetuning_section(plan, checkpoint, name)}

nnU-Net loads encoder and stem strictly, repeats the in-projection for more input channels and
interpolates the position embedding (Primus) when the downstream patch size differs.

{_publish_section(folder, name, plan)}

## Citations
nnU-Net prints these at the start of fine-tuning (the checkpoint's `citations`):

{cites}
"""


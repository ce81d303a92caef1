"""Writers for trained artifacts in the layouts WebUI, ComfyUI and diffusers load, and the whole header schema they
carry: kohya's `ss_*` keys, Stability's `modelspec.*` keys and sdtune's own `sdtune.*` record (see shared/FORMATS.md).

Every write goes through `sdtune.atomic` (temporary file, fsync, rename): a crash never leaves half a file.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save as serialize_safetensors

from sdtune import atomic, formats
from sdtune.config import TrainConfig
from sdtune.families import Family

STABILITY_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def modelspec_metadata(
    family: Family, adapter: str, title: str, resolution: int, prediction_type: str
) -> dict[str, str]:
    """Stability ModelSpec 1.0.1 keys for an adapter (`lora` or `textual-inversion`) of the given family.
    (kohya's `sai_model_spec.determine_implementation` names Stability's repository for every embedding, the
    family's implementation for LoRAs.)"""
    textual_inversion = adapter == "textual-inversion"
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{family.modelspec_arch(prediction_type)}/{adapter}",
        "modelspec.implementation": STABILITY_IMPLEMENTATION if textual_inversion else family.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }


def save_embedding(path: Path, vectors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Writes a textual-inversion embedding: one float32 `[n, width]` tensor per text encoder, under the family's
    embedding keys (`{"emb_params": ...}` for SD1.x, kohya's layout).

    A1111 and ComfyUI read the tensors; diffusers reads an `emb_params` file with `load_textual_inversion(path,
    token=...)`.

    Args:
        path: Target `.safetensors` file.
        vectors: Embedding key -> its `[n, width]` vectors.
        metadata: Header entries (strings only).

    Returns:
        The path written.
    """
    for key, tensor in vectors.items():
        if tensor.ndim != 2:
            raise ValueError(f"an embedding must be [vectors, width], got {key}: {tuple(tensor.shape)}.")
    tensors = {key: tensor.detach().float().cpu().contiguous() for key, tensor in vectors.items()}
    return atomic.write_bytes(path, serialize_safetensors(tensors, metadata=metadata), durable=True)


def a1111_hashes(blob: bytes) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of a serialized safetensors file, as A1111 computes them.

    `sshs_model_hash` is sha256 of the bytes after the header (A1111's "addnet" hash: offset 8 + header length);
    `sshs_legacy_hash` is the first 8 hex digits of sha256 of the 0x10000 bytes at offset 0x100000.
    """
    header_length = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_length :]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def serialize_with_a1111_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serializes a safetensors file whose header carries its own `sshs_model_hash` and `sshs_legacy_hash`.

    The hashes cover bytes the header does not change (the tensor data), except that the legacy window's position
    depends on the header's length: so the file is laid out once with same-length placeholders, hashed, and laid out
    again with the real values at the same offsets.
    """
    placeholder = {**metadata, "sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}
    draft = serialize_safetensors(tensors, metadata=placeholder)
    model_hash, legacy_hash = a1111_hashes(draft)
    final = serialize_safetensors(
        tensors, metadata={**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    )
    if a1111_hashes(final) != (model_hash, legacy_hash):
        raise RuntimeError("safetensors laid the file out differently the second time; hashes would be wrong.")
    return final


def lora_export_problems(
    modules: dict[str, formats.LoraModule], key_map: dict, family: Family | None = None
) -> list[str]:
    """Why a LoRA must not be written: keys naming no module of the base, misfit shapes, a text-encoder part that
    diffusers cannot recognise (it needs `out_proj` or an `mlp_*` layer, FORMATS.md rule 3), or (with the `family`)
    an OpenCLIP attention part A1111 would ignore (`formats.open_clip_attention_problems`)."""
    problems = formats.lora_fit_problems(modules, key_map)
    problems += formats.open_clip_attention_problems(family, modules, key_map) if family else []
    text_keys = [key for key in modules if key in key_map and key_map[key][0] != "unet"]
    if text_keys and not any(key.endswith("_out_proj") or "_mlp_" in key for key in text_keys):
        problems.append("the text-encoder part has only q/k/v projections, which diffusers cannot identify")
    return problems


def save_lora_kohya(
    path: Path,
    modules: dict[str, formats.LoraModule],
    key_map: dict,
    dtype: torch.dtype,
    metadata: dict[str, str],
    family: Family | None = None,
) -> Path:
    """Verifies and writes a LoRA in kohya layout with A1111's self-hashes in the header.

    Args:
        path: Target `.safetensors` file.
        modules: kohya key -> factors and alpha.
        key_map: kohya key -> module of the base model (see `formats.module_key_map`); every key must be in it.
        dtype: One dtype for all tensors (alpha included).
        metadata: Header entries (strings); `sshs_*` hashes are added.
        family: The base model's family, for its client rules (OpenCLIP attention).

    Raises:
        FormatError: The LoRA does not fit the base model; nothing is written.
    """
    problems = lora_export_problems(modules, key_map, family)
    if problems:
        raise formats.FormatError(f"refusing to write {path}: " + "; ".join(problems) + ".")
    tensors = {}
    for key, lora in sorted(modules.items()):
        tensors[key + formats.DOWN] = lora.down.to(dtype).contiguous()
        tensors[key + formats.UP] = lora.up.to(dtype).contiguous()
        tensors[key + formats.ALPHA] = torch.tensor(lora.alpha, dtype=dtype)
    return atomic.write_bytes(path, serialize_with_a1111_hashes(tensors, metadata), durable=True)


def save_lora_diffusers(folder: Path, family: Family, components: dict[str, torch.nn.Module]) -> Path:
    """Writes the peft/diffusers layout (`pytorch_lora_weights.safetensors` + adapter metadata) with diffusers' own
    writer for the family's pipeline, into `folder` (replaced atomically). Load it with
    `pipe.load_lora_weights(folder)`.

    Args:
        folder: The folder to write.
        family: The base model's family (its pipeline class writes the file).
        components: `unet` and text encoders by pipeline attribute name; those holding LoRA layers are saved.
    """
    import diffusers
    from peft.utils import get_peft_model_state_dict

    layers, metadata = {}, {}
    for name, model in components.items():
        if getattr(model, "peft_config", None):
            layers[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
            metadata[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    with atomic.atomic_dir(folder, durable=True) as staging:
        getattr(diffusers, family.pipeline_class).save_lora_weights(staging, **layers, **metadata)
    return folder


def _objective_metadata(config, prediction_type: str) -> dict[str, str]:
    """kohya's `ss_*` keys for the objective and precision settings ("None" where kohya writes it for unset);
    `prediction_type` is the base's, however it was decided (config, yaml, marker, probe)."""
    return {
        "ss_mixed_precision": config.mixed_precision,
        "ss_noise_offset": str(config.noise_offset) if config.noise_offset else "None",
        "ss_min_snr_gamma": str(config.min_snr_gamma) if config.min_snr_gamma else "None",
        "ss_prior_loss_weight": str(config.prior_loss_weight),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_clip_skip": str(config.clip_skip) if config.clip_skip > 1 else "None",
    }


def kohya_lora_metadata(config: TrainConfig, family: Family, record: dict[str, str], run: dict) -> dict[str, str]:
    """The `ss_*` keys kohya sd-scripts writes and A1111 reads or shows, all as strings.

    Args:
        config: The TrainConfig.
        family: Base model family.
        record: The base's `sdtune.*` record (`compat.base_record`): name (`ss_sd_model_name`), sha256
            (`ss_new_sd_model_hash`), prediction type.
        run: `started_at` (unix time), `steps`, `epoch`, `num_batches_per_epoch`, `max_steps`, `learning_rates`
            (per group), `dataset` (see `data.dataset_summary`), `num_processes` (data-parallel processes),
            `conv` (LoCon rank and alpha, or None), optional `finished_at`.
    """
    rates = run["learning_rates"]
    conv = run.get("conv")  # from the saved modules: a LoRA continued from a LoCon file has convs, whatever the config
    network_args = {"conv_dim": str(conv[0]), "conv_alpha": str(conv[1])} if conv else {}
    metadata = {
        "ss_output_name": config.output_name,
        "ss_base_model_version": family.kohya_version(record["sdtune.prediction_type"]),
        "ss_v2": str(family.kohya_v2),
        "ss_sd_model_name": record["sdtune.base_model_name"],
        "ss_new_sd_model_hash": record["sdtune.base_model_sha256"],
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(run["network_dim"]),
        "ss_network_alpha": str(run["network_alpha"]),
        "ss_network_args": json.dumps(network_args),
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(rates["unet"]),
        "ss_text_encoder_lr": str(rates["text_encoder"]),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_optimizer": f"torch.optim.AdamW(weight_decay={config.adam_weight_decay})",
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_total_batch_size": str(config.batch_size * config.gradient_accumulation_steps * run["num_processes"]),
        "ss_num_batches_per_epoch": str(run["num_batches_per_epoch"]),
        "ss_num_epochs": str(run["num_epochs"]),
        "ss_epoch": str(run["epoch"]),
        "ss_steps": str(run["steps"]),
        "ss_max_train_steps": str(run["max_steps"]),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_seed": str(config.seed),
        "ss_cache_latents": str(config.cache_latents),
        "ss_training_started_at": str(run["started_at"]),
        "ss_training_comment": "trained with sdtune",
    }
    metadata.update(_objective_metadata(config, record["sdtune.prediction_type"]))
    metadata.update(_dataset_metadata(config, run["dataset"]))
    if "finished_at" in run:
        metadata["ss_training_finished_at"] = str(run["finished_at"])
    return metadata


def _dataset_metadata(config: TrainConfig, dataset: dict) -> dict[str, str]:
    """kohya's `ss_*` keys about the data (`dataset`: see `data.dataset_summary`) and its buckets."""
    metadata = {
        "ss_num_train_images": str(dataset["num_images"]),
        "ss_num_reg_images": str(dataset.get("num_reg_images", 0)),
        "ss_dataset_dirs": json.dumps(dataset["dataset_dirs"]),
        "ss_tag_frequency": json.dumps(dataset["tag_frequency"]),
        "ss_reg_dataset_dirs": json.dumps(dataset.get("reg_dataset_dirs", {})),
        "ss_enable_bucket": str(config.enable_bucket),
    }
    if config.enable_bucket:
        metadata["ss_bucket_info"] = json.dumps(dataset["bucket_info"])
        metadata["ss_min_bucket_reso"] = str(config.min_bucket_reso)
        metadata["ss_max_bucket_reso"] = str(config.max_bucket_reso)
        metadata["ss_bucket_no_upscale"] = str(config.bucket_no_upscale)
    return metadata


def embedding_metadata(config: TrainConfig, family: Family, record: dict[str, str], steps: int) -> dict[str, str]:
    """The header of an embedding file: ModelSpec, the base's `sdtune.*` record, and what was trained."""
    metadata = modelspec_metadata(
        family, "textual-inversion", config.embedding_name, config.resolution, record["sdtune.prediction_type"]
    )
    metadata["modelspec.trigger_phrase"] = config.embedding_name
    metadata.update(record)
    metadata.update(
        {
            "sdtune.kind": "textual_inversion",
            "sdtune.placeholder_token": config.placeholder_token,
            "sdtune.num_vectors": str(config.num_vectors),
            "sdtune.init_word": config.init_word,
            "sdtune.steps": str(steps),
            "sdtune.resolution": str(config.resolution),
        }
    )
    return metadata


def lora_metadata(config: TrainConfig, family: Family, record: dict[str, str], run: dict) -> dict[str, str]:
    """The header of a LoRA file: kohya's `ss_*` keys (`run` as in `kohya_lora_metadata`), ModelSpec, the base's
    `sdtune.*` record, and for pivotal tuning the embedding it expects."""
    metadata = kohya_lora_metadata(config, family, record, run)
    metadata.update(
        modelspec_metadata(family, "lora", config.output_name, config.resolution, record["sdtune.prediction_type"])
    )
    metadata.update(record)
    metadata.update(
        {"sdtune.kind": "lora", "sdtune.steps": str(run["steps"]), "sdtune.resolution": str(config.resolution)}
    )
    if config.uses_ti:  # pivotal tuning: the LoRA expects its embedding file
        metadata["modelspec.trigger_phrase"] = config.embedding_name
        metadata["sdtune.companion_embedding"] = f"{config.embedding_name}.safetensors"
        metadata["sdtune.placeholder_token"] = config.placeholder_token
    return metadata

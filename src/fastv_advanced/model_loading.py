"""Loading a LLaVA for evaluation, and what can be checked about a model path before loading it.

- `inspect_model_path(path)` reads `config.json` only (no weights): format, decoder layers, image tokens, so that
  flags can be checked before a 7B model loads.
- `load_model(path, ...)` -> `LoadedModel(model, processor, info)`: a transformers-format checkpoint of a supported
  family (local folder, or a hub id already in the local cache) through its processor (`processors.load_processor`,
  PIL image backend, no video processor) and `AutoModelForImageTextToText` with SDPA for text and vision, or an
  original-format (liuhaotian) LLaVA-1.5 checkpoint through `original_checkpoint.load_original_checkpoint`.

Supported families (`config.json`'s `model_type`): llava (LLaVA-1.5, the guide's protocol), llava_next,
llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl, gemma3 (prompts through the processor's chat template).
"""

from __future__ import annotations

import json
import os
import platform
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .adapters import supported_model_types
from .flops import DecoderShape
from .processors import load_processor
from .prompting import fixed_image_tokens


@dataclass
class ModelInfo:
    """Where a model came from and how it runs (recorded in every result)."""

    model_path: str
    model_base: str | None
    format: str  # "transformers" or "original"
    dtype: str
    device: str
    device_name: str
    num_layers: int
    num_image_tokens: int | None  # per image; None where it depends on the image's size (anyres, Qwen-VL)
    image_processor: str
    image_aspect_ratio: str | None = None  # "pad"/"crop" as the checkpoint declares it (original format), else None
    model_type: str = "llava"  # config.json's model_type: which family, and so which prompt protocol
    architecture: str = "LlavaForConditionalGeneration"
    decoder: str = ""  # the language model's model_type (llama, mistral, qwen2, gemma3_text, ...)
    vision_tower: str = ""  # the vision tower's model_type (clip_vision_model, siglip_vision_model, qwen2_vl, ...)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object
    info: ModelInfo


@dataclass
class ModelSpec:
    """What can be read from a model path without loading weights (to check flags before the model loads)."""

    path: str
    format: str  # "transformers" or "original"
    local: bool
    num_layers: int | None
    num_image_tokens: int | None
    image_aspect_ratio: str | None = None
    decoder_shape: DecoderShape | None = None  # for theoretical FLOPs before loading
    model_type: str = "llava"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _original_checkpoint_module():
    try:
        from . import original_checkpoint
    except ImportError:
        return None
    return original_checkpoint


def _looks_original(config: dict) -> bool:
    return "LlavaLlamaForCausalLM" in (config.get("architectures") or []) or "mm_vision_tower" in config


def original_preprocessing(image_aspect_ratio: str | None) -> str:
    """`--image-aspect-ratio` equivalent of an original checkpoint's `image_aspect_ratio`: LLaVA pads for "pad" and
    otherwise hands the image to the CLIP processor as is (shortest-edge resize + centre crop = "crop")."""
    return "pad" if image_aspect_ratio == "pad" else "crop"


def _vision_tokens_from_name(name: str | None) -> int | None:
    """576 for `openai/clip-vit-large-patch14-336` (CLS dropped), None when the name does not say."""
    match = re.search(r"patch(\d+)(?:-(\d+))?", name or "")
    if not match:
        return None
    size = int(match.group(2) or 224)
    return (size // int(match.group(1))) ** 2


def inspect_model_path(model_path: str) -> ModelSpec:
    """Check a `--model-path` and read its shape from `config.json` (no weights loaded).

    ValueError with a clear message for a missing folder, a folder without `config.json`, the literal
    `liuhaotian/...` hub id that is not present locally, or a hub id absent from the local cache.
    """
    path = Path(model_path).expanduser()
    if path.is_dir():
        return _inspect_folder(model_path, path)
    if model_path.startswith("liuhaotian/"):
        raise ValueError(
            f"--model-path {model_path} is an original-format LLaVA checkpoint on the Hugging Face hub and is not "
            "present locally; this machine has no network access to fetch it. Download it first (e.g. "
            f"`huggingface-cli download {model_path} --local-dir ./models/{model_path.split('/')[-1]}`) and pass the "
            "local folder, or convert it to the transformers format with `fastv-convert`."
        )
    if model_path.startswith((".", "/", "~")) or not _HUB_ID.match(model_path):
        raise ValueError(f"--model-path {model_path} does not exist (not a folder, and not a hub id 'owner/name')")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except Exception as exc:  # noqa: BLE001 - offline or unknown id
        raise ValueError(
            f"--model-path {model_path} is not a local folder and cannot be loaded from the hub or the local "
            f"Hugging Face cache ({type(exc).__name__}: {exc}). Download it first, then pass the local folder."
        ) from exc
    check_family(model_path, config.model_type)
    return _transformers_spec(model_path, config, local=False)


def check_family(model_path: str, model_type: str | None) -> None:
    """ValueError naming the supported families when `model_type` is not one of them."""
    if model_type not in supported_model_types():
        raise ValueError(
            f"--model-path {model_path}: model_type {model_type!r} is not supported; supported families: "
            f"{', '.join(supported_model_types())}"
        )


def _transformers_spec(resolved: str, config, local: bool) -> ModelSpec:
    """The `ModelSpec` of a transformers-format checkpoint of a supported family whose config is `config`."""
    return ModelSpec(
        resolved, "transformers", local, config.text_config.num_hidden_layers, fixed_image_tokens(config),
        decoder_shape=DecoderShape.from_text_config(config.text_config), model_type=config.model_type,
    )


def _inspect_folder(model_path: str, path: Path) -> ModelSpec:
    """The `ModelSpec` of a local checkpoint folder (`model_path` as given, for messages)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"--model-path {model_path}: the folder has no config.json, so it is not a checkpoint")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--model-path {model_path}: cannot read {config_file}: {exc}") from exc
    module = _original_checkpoint_module()
    original = module.is_original_checkpoint(str(path)) if module is not None else _looks_original(config)
    if original:
        return ModelSpec(
            path=str(path.resolve()),
            format="original",
            local=True,
            num_layers=config.get("num_hidden_layers"),
            num_image_tokens=_vision_tokens_from_name(config.get("mm_vision_tower")),
            image_aspect_ratio=original_preprocessing(config.get("image_aspect_ratio")),
            decoder_shape=_flat_decoder_shape(config),
        )
    check_family(model_path, config.get("model_type"))
    from transformers import AutoConfig

    try:
        parsed = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad checkpoint
        raise ValueError(f"--model-path {model_path}: config.json cannot be read as a "
                         f"{config.get('model_type')} config: {exc}") from exc
    return _transformers_spec(str(path.resolve()), parsed, local=True)


def _flat_decoder_shape(config: dict) -> DecoderShape | None:
    """The decoder shape of an original-format checkpoint's flat Llama fields (None when incomplete)."""
    try:
        return DecoderShape.from_text_config(SimpleNamespace(**config))
    except (AttributeError, TypeError):
        return None


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; ValueError when cuda is asked for and absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r} is not a torch device (use auto, cpu, cuda or cuda:N)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu or auto)")
    return resolved


_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float32": torch.float32, "fp32": torch.float32}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> float16 on GPU, float32 on CPU; else the named dtype."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; choose auto, float16, bfloat16 or float32")
    return _DTYPES[dtype]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def load_model(
    model_path: str,
    model_base: str | None = None,
    device: str | torch.device = "auto",
    dtype: str = "auto",
    *,
    progress: bool = True,
) -> LoadedModel:
    """Load a LLaVA for evaluation: transformers format via `AutoProcessor` + `LlavaForConditionalGeneration`
    (SDPA for text and vision, PIL image processor, local folders never touch the network), or an original-format
    checkpoint through `original_checkpoint.load_original_checkpoint`. `progress=False` hides transformers'
    progress bars (`Loading weights`) while loading."""
    spec = inspect_model_path(model_path)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    with _transformers_progress_bars(progress):
        model, processor = _load_weights(model_path, spec, model_base, device, torch_dtype)
    model.eval()
    config_ratio = spec.image_aspect_ratio
    if spec.format == "original":
        config_ratio = original_preprocessing(getattr(model.config, "image_aspect_ratio", None))
    info = model_info_from(model, processor, model_path=spec.path, model_base=model_base, format=spec.format,
                           image_aspect_ratio=config_ratio)
    return LoadedModel(model, processor, info)


@contextmanager
def _transformers_progress_bars(enabled: bool):
    """transformers' (and the hub's) progress bars on or off for the block, then as they were."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    if enabled == was_enabled:
        yield
        return
    switch = transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar
    restore = transformers_logging.enable_progress_bar if was_enabled else transformers_logging.disable_progress_bar
    switch()
    try:
        yield
    finally:
        restore()


def _load_weights(model_path: str, spec: ModelSpec, model_base: str | None, device: torch.device,
                  dtype: torch.dtype):
    """(model, processor) of the checkpoint `spec` describes (`model_path` as given, for messages), on `device` in
    `dtype`."""
    if spec.format == "original":
        module = _original_checkpoint_module()
        if module is None:
            raise ValueError(
                f"--model-path {model_path} is an original-format (liuhaotian) checkpoint; loading it needs "
                "fastv_advanced.original_checkpoint, which is not available in this installation. Convert it to the "
                "transformers format with `fastv-convert` and pass the converted folder."
            )
        return module.load_original_checkpoint(spec.path, model_base=model_base, dtype=dtype, device=device)
    if model_base is not None:
        raise ValueError(
            f"--model-base applies to original-format checkpoints (LoRA or projector-only weights); "
            f"{model_path} is a complete transformers-format checkpoint"
        )
    from transformers import AutoModelForImageTextToText

    processor = load_processor(spec.path, spec.model_type, local_files_only=spec.local)
    model = AutoModelForImageTextToText.from_pretrained(
        spec.path,
        dtype=dtype,
        attn_implementation={"text_config": "sdpa", "vision_config": "sdpa"},
        local_files_only=spec.local,
    )
    return model.to(device), processor


def model_info_from(model, processor, *, model_path: str | None = None, model_base: str | None = None,
                    format: str = "transformers", image_aspect_ratio: str | None = None) -> ModelInfo:
    """The `ModelInfo` (the result file's model card) of a loaded model; `model_path` defaults to the path the
    config was read from (or the class name of a model built in memory)."""
    parameter = next(model.parameters())
    config = model.config
    return ModelInfo(
        model_path=model_path or str(getattr(config, "_name_or_path", "") or type(model).__name__),
        model_base=model_base,
        format=format,
        dtype=str(parameter.dtype).replace("torch.", ""),
        device=str(parameter.device),
        device_name=device_name(parameter.device),
        num_layers=config.text_config.num_hidden_layers,
        num_image_tokens=fixed_image_tokens(config),
        image_processor=type(processor.image_processor).__name__,
        image_aspect_ratio=image_aspect_ratio,
        model_type=config.model_type,
        architecture=type(model).__name__,
        decoder=getattr(config.text_config, "model_type", ""),
        vision_tower=getattr(config.vision_config, "model_type", ""),
    )

"""`fastv-convert SRC DST`: write an original-format LLaVA-1.5 checkpoint as a transformers-format directory."""

from __future__ import annotations

import argparse

from ..original_checkpoint import convert_original_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastv-convert",
        description=(
            "Convert an original-format LLaVA-1.5 checkpoint (haotian-liu/LLaVA, e.g. liuhaotian/llava-v1.5-7b) "
            "into a transformers LlavaForConditionalGeneration + processor directory. "
            "See docs/original_checkpoints.md for the mapping and what is supported."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="local directory of the original checkpoint (config.json, "
                        "pytorch_model-*.bin + index or safetensors, tokenizer.model)")
    parser.add_argument("dst", metavar="DST", help="output directory; must not exist or be empty")
    parser.add_argument("--model-base", default=None, help="local Llama/Vicuna (or original LLaVA) directory "
                        "supplying the language-model weights and tokenizer of a projector-only checkpoint "
                        "(SRC holds only mm_projector.bin); LoRA checkpoints must be merged first")
    parser.add_argument("--vision-tower", default=None, help="local CLIP directory or hub id overriding the "
                        "config's mm_vision_tower (e.g. a local copy of openai/clip-vit-large-patch14-336)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        convert_original_checkpoint(args.src, args.dst, model_base=args.model_base, vision_tower=args.vision_tower)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

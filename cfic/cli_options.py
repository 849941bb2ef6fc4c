"""The options the ``cfic`` commands share (model, device, acceleration, span budget), in one place so every
command spells them the same way and the component CLIs (``serve``, ``evaluate``, ``bench``) need not import the
main CLI module."""

from __future__ import annotations

from typing import Annotated

import typer

ModelOpt = Annotated[str | None, typer.Option("--model", help="Local HF folder or .gguf file (default: packaged "
                                                                "SmolLM2-135M-Instruct).")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cuda when available).")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="float32, bfloat16 or float16 (default: per device).")]
AdapterOpt = Annotated[str | None, typer.Option("--adapter", help="A PEFT LoRA adapter folder to apply.")]
NoAdapterOpt = Annotated[bool, typer.Option("--no-adapter", help="Do not apply the bundled CFIC adapter.")]
# Acceleration (SwiftKV on for the default model through its shipped parameters, the rest off; `cfic bench` measures
# each against the full model). Ranges are checked by
# cfic.config.acceleration_options so a bad value is one `error:` line, before the model loads.
SwiftKVLayerOpt = Annotated[int | None, typer.Option(
    "--swiftkv-layer", help="SwiftKV SingleInputKV from layer l on: the document runs only layers < l (zero-training "
                            "unless --swiftkv gives distilled parameters).")]
SwiftKVGroupOpt = Annotated[int | None, typer.Option(
    "--swiftkv-group", help="AcrossKV: one K/V per group of this many SwiftKV layers (less KV memory per token).")]
SwiftKVOpt = Annotated[str | None, typer.Option(
    "--swiftkv", help="SwiftKV parameters: 'auto' (default: the ones shipped for the loaded weights, i.e. on for the "
                      "default model), 'none' (off), 'bundled', or a file from `cfic distill-swiftkv`.")]
LayerSkipOpt = Annotated[int | None, typer.Option(
    "--layer-skip", help="SkipDecode: answer tokens skip up to this many lower layers (0: off).")]
LayerSkipWarmupOpt = Annotated[int | None, typer.Option(
    "--layer-skip-warmup", help="Layers that always run below the skipped band (default 4).")]
FFNSkipOpt = Annotated[float | None, typer.Option(
    "--ffn-skip", help="FFN-SkipLLM: an answer token whose FFN block left it at least this cosine-similar skips the "
                       "following FFN blocks (0 < value <= 1; off by default).")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=1, help="Evidence spans to return per question.")]
MaxSpanTokensOpt = Annotated[int | None, typer.Option(
    "--max-span-tokens", min=1, help="Skip-decoding budget in tokens (default 128).")]
ThresholdOpt = Annotated[float | None, typer.Option("--threshold", min=0.0, max=1.0,
                                                    help="Drop spans scoring below this (0..1).")]

"""The options the ``cfic`` commands share (model, device, acceleration, span budget), in one place so every
command spells them the same way and the component CLIs (``serve``, ``evaluate``, ``bench``) need not import the
main CLI module."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any, TypeVar

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


# ---------------------------------------------------------------- option groups
# Option groups: runs of options that several commands take together, declared once.
#
# ``cfic ground`` and ``cfic batch`` both take the answer options and the model choice; ``cfic ground`` and
# ``cfic evaluate`` both take the acceleration options. Spelled out in each signature they were copies that drifted
# (help texts, defaults). A command now declares one parameter per group, annotated with the group's class, and
# :func:`with_option_groups` shows the group's fields as the command's options, in place and in order, and hands the
# command one group object built from them. The fields use the shared ``Annotated`` options of
# :mod:`cfic.cli_options`, so ``--help`` and parsing are the same as when they were written out.
#
# Only the signature the command line reads (``__signature__``, PEP 362) changes; the function itself is untouched.

Command = TypeVar("Command", bound=Callable[..., Any])


class OptionGroup:
    """Base of the groups: a frozen dataclass whose fields are ``Annotated[..., typer.Option(...)]`` with defaults."""


@dataclass(frozen=True)
class AnswerOptions(OptionGroup):
    """How many spans, how long, how sure: ``--top-k``, ``--max-span-tokens``, ``--threshold``."""

    top_k: TopKOpt = 3
    max_span_tokens: MaxSpanTokensOpt = None
    threshold: ThresholdOpt = None

    def span_budget(self) -> dict[str, int]:
        """``--max-span-tokens`` as ``Grounder.from_pretrained`` keywords (a sentence may not exceed the budget)."""
        if self.max_span_tokens is None:
            return {}
        return {"max_span_tokens": self.max_span_tokens, "max_sentence_tokens": min(96, self.max_span_tokens)}


@dataclass(frozen=True)
class ModelChoice(OptionGroup):
    """Which weights load where: ``--model``, ``--device``, ``--dtype``, ``--adapter``, ``--no-adapter``."""

    model: ModelOpt = None  # the packaged SmolLM2
    device: DeviceOpt = None  # cuda when available
    dtype: DtypeOpt = None  # chosen per device
    adapter: AdapterOpt = None  # "auto": the bundled adapter, on the default model only
    no_adapter: NoAdapterOpt = False  # the plain weights (excludes --adapter)

    def load_options(self) -> dict[str, Any]:
        """``Grounder.from_pretrained`` keywords; the adapter flags through ``cfic.config.adapter_choice``."""
        from cfic.config import adapter_choice

        return {"model": self.model, "device": self.device, "dtype": self.dtype,
                "adapter": adapter_choice(self.adapter, self.no_adapter)}


@dataclass(frozen=True)
class AccelerationOptions(OptionGroup):
    """SwiftKV, AcrossKV, SkipDecode and FFN skipping (``cfic.config.acceleration_options`` checks the values)."""

    swiftkv_layer: SwiftKVLayerOpt = None  # None: the layer of the SwiftKV parameters in use, if any
    swiftkv_group: SwiftKVGroupOpt = None  # None: theirs, else 1
    swiftkv: SwiftKVOpt = None  # None: "auto", the parameters shipped for the loaded weights
    layer_skip: LayerSkipOpt = None  # None: off
    layer_skip_warmup: LayerSkipWarmupOpt = None  # None: the GroundingConfig default
    ffn_skip: FFNSkipOpt = None  # None: off

    def resolve(self) -> tuple[dict[str, Any], str | None]:
        """(GroundingConfig options, ``swiftkv`` argument of ``Grounder.from_pretrained``); bad values raise."""
        from cfic.config import acceleration_options

        return acceleration_options(self.swiftkv_layer, self.swiftkv_group, self.swiftkv, self.layer_skip,
                                    self.layer_skip_warmup, self.ffn_skip)


def _group_parameters(group: type[OptionGroup], kind: inspect._ParameterKind) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(group, include_extras=True)
    return [inspect.Parameter(f.name, kind, default=f.default, annotation=hints[f.name]) for f in fields(group)]


def with_option_groups(command: Command) -> Command:
    """Show each parameter annotated with an :class:`OptionGroup` as that group's options, and call ``command``
    with the group built from them."""
    signature = inspect.signature(command, eval_str=True)
    groups = {name: p.annotation for name, p in signature.parameters.items()
              if isinstance(p.annotation, type) and issubclass(p.annotation, OptionGroup)}
    parameters: list[inspect.Parameter] = []
    for p in signature.parameters.values():
        parameters += _group_parameters(groups[p.name], p.kind) if p.name in groups else [p]

    @functools.wraps(command)
    def run(**options: Any) -> Any:
        for name, group in groups.items():
            options[name] = group(**{f.name: options.pop(f.name) for f in fields(group)})
        return command(**options)

    run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return typing.cast(Command, run)

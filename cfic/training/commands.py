"""The command lines of the training jobs: ``cfic train``, ``distill-swiftkv``, ``fit-prior``, ``fit-attention``,
``fit-abstention``.

Thin: they parse, build the job's settings, run it (or relaunch it in the background) and print. A bad value ends
as ``cfic.cli``'s one-line ``error:`` (every job raises ``CficError`` for them). Importing this module imports no
torch, so the CLI can register the commands cheaply.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cfic.errors import CficError
from cfic.training.detach import relaunch_detached


def train_command(
    out: Annotated[str, typer.Option("--out", help="Run folder: checkpoints, logs and the final adapter/.")] =
    "runs/train",
    model: Annotated[str | None, typer.Option("--model", help="Base model (default: packaged SmolLM2).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps.")] = 165,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Items per step (gradient accumulation).")] = 4,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate.")] = 3e-4,
    rank: Annotated[int, typer.Option("--rank", min=1, help="LoRA rank.")] = 16,
    max_minutes: Annotated[float, typer.Option("--max-minutes", min=0.1, help="Stop (and save) after this.")] = 55.0,
    nq_passages: Annotated[int, typer.Option("--nq-passages", min=1, help="Passages per NQ training document.")] = 6,
    seed: Annotated[int, typer.Option("--seed", help="Seed for data order and initialisation.")] = 0,
    detach: Annotated[bool, typer.Option("--detach", help="Run in the background; log to <out>/train.log.")] = False,
    calibrate_only: Annotated[bool, typer.Option(
        "--calibrate-only", help="Only (re)choose the no-evidence threshold of <out>/adapter.")] = False,
) -> None:
    """Fine-tune a LoRA adapter for CFIC on the training side of the bundled data (resumes from <out>)."""
    from cfic.training.calibration import calibrate
    from cfic.training.lora import TrainSettings, train

    settings = TrainSettings(out=out, model=model, steps=steps, batch=batch, lr=lr, rank=rank,
                             alpha=2 * rank, max_minutes=max_minutes, nq_passages=nq_passages, seed=seed)
    if detach:
        pid = relaunch_detached("train", "--detach", out, "train")
        typer.echo(f"training in the background (pid {pid}); log: {Path(out) / 'train.log'}; "
                   f"run the same command again to resume after an interruption")
        return
    if calibrate_only:
        adapter = Path(out) / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise CficError(f"{adapter} holds no adapter: train first")
        typer.echo(json.dumps(calibrate(adapter, settings), indent=2))
        return
    summary = train(settings)
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(f"adapter written to {Path(out) / 'adapter'}")


def distill_swiftkv_command(
    out: Annotated[str, typer.Option("--out", help="Run folder: checkpoint, history, swiftkv.safetensors.")] =
    "runs/swiftkv",
    model: Annotated[str | None, typer.Option("--model", help="Model folder (default: packaged SmolLM2).")] = None,
    adapter: Annotated[str | None, typer.Option("--adapter", help="PEFT adapter to distil against (default: the "
                                                                   "bundled one, as inference uses).")] = None,
    no_adapter: Annotated[bool, typer.Option("--no-adapter", help="Distil against the plain model.")] = False,
    layer: Annotated[int | None, typer.Option("--layer", min=1, help="SwiftKV layer l (default: half the "
                                                                      "layers).")] = None,
    group: Annotated[int, typer.Option("--group", min=1, help="AcrossKV group size.")] = 1,
    q_rank: Annotated[int, typer.Option("--q-rank", min=0, help="Rank of the query correction (0: none).")] = 16,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps.")] = 300,
    accumulate: Annotated[int, typer.Option("--accumulate", min=1, help="Prompts per step.")] = 4,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate.")] = 5e-4,
    passages: Annotated[int, typer.Option("--passages", min=1, help="NQ passages per training document.")] = 10,
    answer_tokens: Annotated[int, typer.Option("--answer-tokens", min=1,
                                               help="Teacher-forced answer tokens per prompt (loss rows).")] = 128,
    max_minutes: Annotated[float, typer.Option("--max-minutes", min=0.1,
                                               help="Stop and save after this many minutes (all runs).")] = 55.0,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch threads (default: torch's).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for data order and initialisation.")] = 0,
    background: Annotated[bool, typer.Option("--background", help="Run detached; log to <out>/distill.log. Run "
                                                                   "the same command again to resume.")] = False,
) -> None:
    """Distil SwiftKV parameters (norm, K/V and query correction of layers >= l) against the unmodified model."""
    from cfic.config import adapter_choice
    from cfic.training.distill import DistillSettings, distill

    settings = DistillSettings(out=out, model=model, adapter=adapter_choice(adapter, no_adapter),
                               layer=layer, group=group, q_rank=q_rank, steps=steps, accumulate=accumulate, lr=lr,
                               passages=passages, answer_tokens=answer_tokens, max_minutes=max_minutes,
                               threads=threads, seed=seed)
    if background:
        pid = relaunch_detached("distill-swiftkv", "--background", out, "distill")
        typer.echo(f"distilling in the background (pid {pid}); log: {Path(out) / 'distill.log'}; "
                   "run the same command again to resume after an interruption")
        return
    summary = distill(settings)
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(f"SwiftKV parameters written to {summary['params']} "
               f"(use: Grounder.from_pretrained(swiftkv={summary['params']!r}))")


def fit_prior_command(
    examples: Annotated[int, typer.Option("--examples", min=4, help="NQ train questions for stage 1/2.")] = 60,
    hotpot_examples: Annotated[int, typer.Option("--hotpot-examples", min=0,
                                                 help="HotpotQA train questions for stage 1/2.")] = 30,
    stage1_examples: Annotated[int, typer.Option("--stage1-examples", min=4,
                                                 help="NQ train questions for stage 1 (embeddings only).")] = 400,
    adapter: Annotated[str | None, typer.Option("--adapter", help="Adapter folder (default: the bundled one); "
                                                "its cfic.json gets the fitted settings.")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Write the settings here instead of the adapter.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Model dtype (default: the machine's).")] = None,
    squad_questions: Annotated[int, typer.Option("--squad-questions", min=4,
                                                 help="Held-out SQuAD training questions (the stage-2 pool).")] = 200,
    squad_stage2: Annotated[int, typer.Option("--squad-stage2", min=0,
                                              help="Answerable ones among them that also enter stage 2.")] = 30,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch threads.")] = None,
) -> None:
    """Fit the sentence prior and the LM weight on the training splits; write them to cfic.json (the abstention
    model is `cfic fit-abstention`'s)."""
    from cfic.training.fit_prior import fit_prior

    report = fit_prior(examples, hotpot_examples, stage1_examples, adapter, out, dtype, n_squad=squad_questions,
                       threads=threads, n_squad_stage2=squad_stage2)
    _print_report(report)


def fit_attention_command(
    nq: Annotated[int, typer.Option("--nq", min=0, help="NQ training questions.")] = 200,
    hotpot: Annotated[int, typer.Option("--hotpot", min=0, help="HotpotQA training questions.")] = 100,
    squad: Annotated[int, typer.Option("--squad", min=0, help="Answerable SQuAD training-article questions held out "
                                       "of LoRA training.")] = 200,
    squad_second: Annotated[int, typer.Option("--squad-second", min=0, help="Answerable questions of the other SQuAD "
                                              "training article(s), which no earlier fit read.")] = 400,
    material: Annotated[str, typer.Option("--material", help="Folder for the collected attention (one .npz per "
                                          "question; an interrupted run resumes from it).")] = "runs/attention",
    adapter: Annotated[str | None, typer.Option("--adapter", help="Adapter folder (default: the bundled one); its "
                                                "cfic.json and attention ranker are written.")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Write cfic.json (and the ranker next to it) here instead."
                                            )] = None,
) -> None:
    """Fit the attention ranker (which heads' question-to-sentence attention marks evidence) and its fusion weight
    with the prior on the training side; write them with the adapter."""
    from cfic.training.fit_attention import fit_attention

    _print_report(fit_attention(material, nq, hotpot, squad, adapter, out, n_squad_second=squad_second))


def fit_query_heads_command(
    nq: Annotated[int, typer.Option("--nq", min=1, help="NQ training questions (from 460 on).")] = 400,
    hotpot: Annotated[int, typer.Option("--hotpot", min=0, help="HotpotQA training questions.")] = 100,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the material.")] = 6,
    folds: Annotated[int, typer.Option("--folds", min=2, help="Cross-validation folds of the report.")] = 4,
    material: Annotated[str, typer.Option("--material", help="Folder for the question passes' queries and keys "
                                          "(one file per question, ~5 MB each; a run resumes).")] = "runs/query-heads",
    adapter: Annotated[str | None, typer.Option("--adapter", help="Adapter folder (default: the bundled one); the "
                                                "ranker with the update is written next to its ranker.")] = None,
    enable: Annotated[bool, typer.Option("--enable", help="Ground with the updated ranker (cfic.json's "
                                         "attention.query_update.enabled); default: fitted, switched off.")] = False,
) -> None:
    """Train a low-rank change of a few layers' queries so the attention ranker's heads rank evidence (the ranker's
    weights and fusion stay); cross-validated on the training side, then fitted on all of it."""
    from cfic.training.query_heads import fit_query_heads

    _print_report(fit_query_heads(material, nq, hotpot, adapter, epochs, folds, enable=enable))


def fit_abstention_command(
    nq: Annotated[int, typer.Option("--nq", min=0, help="NQ training questions (each with and without evidence).")]
    = 130,
    hotpot: Annotated[int, typer.Option("--hotpot", min=0, help="HotpotQA training questions (likewise).")] = 45,
    adapter: Annotated[str | None, typer.Option("--adapter", help="Adapter folder (default: the bundled one); its "
                                                "cfic.json and answerability probe are written.")] = None,
    out: Annotated[str | None, typer.Option("--out", help="Write cfic.json and the probe to this folder instead.")]
    = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Model dtype (default: the machine's).")] = None,
    l2: Annotated[float, typer.Option("--l2", min=0.0, help="L2 penalty of the probe (standardised states).")]
    = 0.15,
    max_false_abstention: Annotated[float, typer.Option(
        "--max-false-abstention", min=0.0, max=1.0,
        help="Abstain on at most this share of any source's answerable training questions (cross-validated); "
             "1 lets accuracy alone choose.")] = 0.1,
    probe_sources: Annotated[str, typer.Option(
        "--probe-sources", help="Comma-separated sources the probe is fitted on (squad, nq, hotpotqa); the others "
                                "only calibrate the threshold.")] = "squad",
    material: Annotated[Path | None, typer.Option("--material", help="Folder for the question passes' material "
                                                  "(one file per item; an interrupted run resumes).")]
    = Path("runs/abstention"),
) -> None:
    """Fit the abstention model (features held out by article) and its threshold on the training side; write them
    with the adapter."""
    from cfic.training.fit_abstention import fit_abstention

    report = fit_abstention(nq, hotpot, adapter, out, dtype, l2, material=material,
                            max_false_abstention=max_false_abstention,
                            probe_sources=tuple(x.strip() for x in probe_sources.split(",") if x.strip()))
    _print_report(report)


def _print_report(report: dict) -> None:
    """A fit's report as JSON on stderr (stdout stays free for scripts; the result is in the adapter's files)."""
    from rich.console import Console

    Console(stderr=True).print_json(json.dumps(report))

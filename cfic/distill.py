"""``cfic distill-swiftkv``: distil SwiftKV parameters against the unmodified model.

Only the SwiftKV parameters train: the norm of the layer-``l`` input, the K/V projections of layers ``>= l`` (one
per AcrossKV group) and a low-rank correction of those layers' query projections. The teacher is the same model run
normally; because layers ``< l`` are shared, one teacher pass gives both the targets and the student's input (the
hidden states entering layer ``l``), and the student then runs exactly the inference path (``decoding.runner
.forward`` resumed at layer ``l``, upper layers for the answer rows only, K/V for every token from the layer-``l``
input). Loss, as in SwiftKV: KL divergence at temperature T (times T^2) between student and teacher next-token
distributions at the answer rows, plus ``mse_weight`` x the mean squared error of the final hidden states at those
rows (divided by the teacher's mean square so the weight does not depend on the model's hidden-state scale).

The prompts are the ones cfic reads: [head][document][question] built by ``decoding.encode`` from the training side
of the bundled NQ data (``cfic.eval.load_split("nq", "train")``; never the evaluation split), followed by the text the
decoder teacher-forces — a sentence of the document (the gold one most of the time) and the sentences after it.

Runs in the foreground or with ``--background``; checkpoints every few steps into ``--out`` and resumes from there
(the time limit counts all runs together). This module imports no torch at import time.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from cfic.errors import CficError

PARAMS_FILE = "swiftkv.safetensors"


@dataclass
class DistillSettings:
    out: str = "runs/swiftkv"
    model: str | None = None
    adapter: str | None = "auto"
    layer: int | None = None  # default: half the layers
    group: int = 1
    q_rank: int = 16
    steps: int = 300
    accumulate: int = 4
    lr: float = 5e-4
    warmup: int = 10
    temperature: float = 2.0
    mse_weight: float = 1.0
    passages: int = 10
    answer_tokens: int = 128
    gold_share: float = 0.75
    max_prompt_tokens: int = 2048
    max_minutes: float = 55.0
    checkpoint_every: int = 10
    seed: int = 0
    autocast: bool = True
    threads: int | None = None
    limit: int | None = None  # training examples to read (for quick runs and tests)


@dataclass(frozen=True)
class DistillItem:
    ids: tuple[int, ...]
    n_prompt: int  # loss rows: n_prompt - 1 .. len(ids) - 2 (each predicts the next token)


def distill_items(tokenizer, template, config, settings: DistillSettings) -> list[DistillItem]:
    """Prompts plus teacher-forced continuations from the NQ training split, shuffled with the run's seed."""
    from cfic.decoding.encode import plan_document
    from cfic.eval import load_split

    rng = random.Random(settings.seed)
    examples = load_split("nq", "train", k=settings.passages, seed=settings.seed, limit=settings.limit)
    items = []
    for ex in examples:
        plan = plan_document(tokenizer, template, ex.documents[0], ex.id, {}, config, 10**9)
        prompt = list(template.head_ids) + [t for seg in plan.segment_ids for t in seg]
        prompt += template.query_ids(tokenizer, ex.question, config.max_query_tokens)
        gold = [i for i, s in enumerate(plan.sentences) for d, a, b in ex.gold if d == 0 and s.start < b and a < s.end]
        start = gold[0] if gold and rng.random() < settings.gold_share else rng.randrange(len(plan.sentences))
        cont = list(plan.answer_ids[start])
        for s in range(start + 1, len(plan.sentences)):
            if len(cont) >= settings.answer_tokens:
                break
            cont.extend(plan.segment_ids[s])
        cont = cont[: settings.answer_tokens]
        if len(prompt) + len(cont) > settings.max_prompt_tokens:
            continue
        items.append(DistillItem(tuple(prompt + cont), len(prompt)))
    rng.shuffle(items)
    return items


def _lr(step: int, settings: DistillSettings) -> float:
    import math

    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def distill_loss(teacher, student, item: DistillItem, settings: DistillSettings):
    """(loss, kl, relative mse) of one item; ``teacher``/``student`` are LayerRunners over the same model."""
    import torch
    import torch.nn.functional as F

    from cfic.decoding.runner import KVCache, forward

    sw = student.swiftkv
    ids = torch.tensor([item.ids], device=teacher.device)
    n = ids.shape[1]
    positions = torch.arange(n, device=ids.device).unsqueeze(0)
    rows = torch.arange(item.n_prompt - 1, n - 1, device=ids.device)
    with torch.no_grad():
        hidden = teacher.embed(ids)
        rope = teacher.position_embeddings(hidden, positions)
        x_l = hidden
        for j in range(teacher.num_layers):
            if j == sw.layer:
                x_l = hidden
            hidden = teacher.run_layer(j, hidden, rope, None, None)
        t_hidden = hidden[:, rows].float()
        t_logp = torch.log_softmax(teacher.logits(hidden[0, rows]) / settings.temperature, dim=-1)
    cache = KVCache.empty(student, 1, n)
    s_hidden = forward(student, ids, positions, cache, None, outputs=rows, start=sw.layer, hidden=x_l).float()
    s_logp = torch.log_softmax(student.logits(s_hidden[0]) / settings.temperature, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="batchmean") * settings.temperature ** 2
    mse = ((s_hidden - t_hidden) ** 2).mean() / (t_hidden ** 2).mean()
    return kl + settings.mse_weight * mse, kl, mse


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def distill(settings: DistillSettings, progress: bool = True, loaded=None) -> dict[str, Any]:
    """Run (or resume) a distillation; writes ``<out>/swiftkv.safetensors`` at every checkpoint and at the end.
    ``loaded``: an already loaded model (``cfic.models.LoadedModel``, float32) instead of ``settings.model``."""
    import torch

    from cfic.config import GroundingConfig
    from cfic.decoding.encode import PromptTemplate
    from cfic.decoding.runner import LayerRunner
    from cfic.decoding.swiftkv import SwiftKV
    from cfic.models import eos_token_ids, load_model

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    if loaded is None:
        loaded = load_model(settings.model, device="cpu", dtype="float32", adapter=settings.adapter)
    model = loaded.model
    n_layers = len(model.model.layers)
    layer = settings.layer if settings.layer is not None else n_layers // 2
    if not 1 <= layer < n_layers:
        raise CficError(f"--layer must lie in [1, {n_layers - 1}] for a {n_layers}-layer model, got {layer}")
    ckpt_path = out / "checkpoint.pt"
    # weights_only: resuming never unpickles code from a folder that may not be yours.
    state = torch.load(ckpt_path, weights_only=True) if ckpt_path.is_file() else None
    if state is not None:
        saved = state["settings"]
        for key in ("layer", "group", "q_rank", "seed", "passages", "answer_tokens"):
            if key != "layer" and saved[key] != getattr(settings, key):
                raise CficError(f"{out} holds a run with {key}={saved[key]!r}; use another --out or the same {key}")
        if saved["layer_resolved"] != layer:
            raise CficError(f"{out} holds a run at layer {saved['layer_resolved']}; use another --out")
    sw = SwiftKV(model, layer, settings.group, q_rank=settings.q_rank)
    sw.requires_grad_(True)
    sw.train()
    teacher = LayerRunner(model)
    student = LayerRunner(model, sw)
    optimizer = torch.optim.AdamW(sw.parameters(), lr=settings.lr, weight_decay=0.0)
    step, history, minutes_before = 0, [], 0.0
    if state is not None:
        sw.load_state_dict(state["params"])
        optimizer.load_state_dict(state["optimizer"])
        step, history, minutes_before = state["step"], state["history"], state["minutes"]
        torch.set_rng_state(state["rng"])
    config = GroundingConfig()
    template = PromptTemplate.for_tokenizer(loaded.tokenizer, config.instruction,
                                            eos_token_ids(model, loaded.tokenizer))
    items = distill_items(loaded.tokenizer, template, config, settings)
    if not items:
        raise CficError("no distillation items could be built from the training split")
    info_base = {"model": loaded.name, "adapter": loaded.adapter, "settings": asdict(settings) | {"layer": layer}}
    start = time.monotonic()

    def minutes() -> float:
        return minutes_before + (time.monotonic() - start) / 60

    def checkpoint(final: bool = False) -> None:
        _atomic_torch_save({"params": sw.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                            "history": history, "minutes": minutes(), "rng": torch.get_rng_state(),
                            "settings": asdict(settings) | {"layer_resolved": layer}}, ckpt_path)
        recent = history[-10:]
        info = info_base | {"steps": step, "minutes": round(minutes(), 2), "final": final,
                            "kl_last10": sum(h["kl"] for h in recent) / max(1, len(recent)),
                            "kl_first": history[0]["kl"] if history else None}
        sw.save(out / PARAMS_FILE, model_name=loaded.name, info=info)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, initial=step, desc="distill-swiftkv", unit="step")
    stopped = "steps"
    while step < settings.steps:
        if minutes() >= settings.max_minutes:
            stopped = "time limit"
            break
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, settings)
        optimizer.zero_grad(set_to_none=True)
        kl_sum = mse_sum = 0.0
        for j in range(settings.accumulate):
            item = items[(step * settings.accumulate + j) % len(items)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.autocast):
                loss, kl, mse = distill_loss(teacher, student, item, settings)
            (loss / settings.accumulate).backward()
            kl_sum += float(kl.detach())
            mse_sum += float(mse.detach())
        torch.nn.utils.clip_grad_norm_(list(sw.parameters()), 1.0)
        optimizer.step()
        step += 1
        history.append({"step": step, "kl": kl_sum / settings.accumulate, "mse": mse_sum / settings.accumulate,
                        "minutes": round(minutes(), 3)})
        with (out / "history.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(history[-1]) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(kl=f"{history[-1]['kl']:.3f}", mse=f"{history[-1]['mse']:.3f}")
        if step % settings.checkpoint_every == 0:
            checkpoint()
    if bar is not None:
        bar.close()
    checkpoint(final=step >= settings.steps)
    summary = {"params": str(out / PARAMS_FILE), "steps": step, "planned_steps": settings.steps,
               "stopped_by": stopped, "minutes_total": round(minutes(), 2), "items": len(items),
               "examples_seen": step * settings.accumulate, "layer": layer, "group": settings.group,
               "kl_first_step": history[0]["kl"] if history else None,
               "kl_last10": sum(h["kl"] for h in history[-10:]) / max(1, len(history[-10:])),
               "bytes": (out / PARAMS_FILE).stat().st_size, "model": loaded.name, "adapter": loaded.adapter,
               "torch_threads": torch.get_num_threads()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


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

    settings = DistillSettings(out=out, model=model, adapter=adapter_choice(adapter, no_adapter),
                               layer=layer, group=group, q_rank=q_rank, steps=steps, accumulate=accumulate, lr=lr,
                               passages=passages, answer_tokens=answer_tokens, max_minutes=max_minutes,
                               threads=threads, seed=seed)
    if background:
        Path(out).mkdir(parents=True, exist_ok=True)
        args = [a for a in sys.argv[1:] if a != "--background"]
        if args and args[0] == "distill-swiftkv":  # launched as `cfic distill-swiftkv ...`
            args = args[1:]
        log = open(Path(out) / "distill.log", "ab")  # noqa: SIM115 - handed to the child process
        proc = subprocess.Popen([sys.executable, "-m", "cfic.distill", *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=os.environ.copy())
        (Path(out) / "distill.pid").write_text(str(proc.pid))
        typer.echo(f"distilling in the background (pid {proc.pid}); log: {Path(out) / 'distill.log'}; "
                   "run the same command again to resume after an interruption")
        return
    summary = distill(settings)
    typer.echo(json.dumps(summary, indent=2))
    typer.echo(f"SwiftKV parameters written to {summary['params']} "
               f"(use: Grounder.from_pretrained(swiftkv={summary['params']!r}))")


if __name__ == "__main__":  # the --background child (and usable without the CLI wiring)
    typer.run(distill_swiftkv_command)

"""``cfic train``: LoRA supervised fine-tuning that teaches the LM the CFIC task.

Why: zero-shot, a 135M instruct model rarely starts its answer with the right sentence, and its end-of-evidence
probability means little. CFIC trains on (document, question, evidence) with the evidence followed by the
end-of-sequence token and the loss on those tokens only — which is exactly what prefix decoding (first tokens) and
skip decoding (P(end) after each sentence) read. Prompts are built by the same code as at inference
(``decoding.encode``), evidence is tokenised as the decoder sees it (first sentence as emitted at the start of an
answer, following sentences as they stand in the document), and unanswerable questions teach an immediate end.

Training data comes only from the training side of the bundled data (``cfic.eval.load_split(..., "train")``),
never from the evaluation split.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from cfic.errors import CficError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainItem:
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]  # evidence tokens then end-of-evidence; the only tokens with a loss
    source: str


@dataclass
class TrainSettings:
    out: str = "runs/train"
    model: str | None = None
    steps: int = 165
    batch: int = 4
    lr: float = 3e-4
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    warmup: int = 30
    max_minutes: float = 55.0
    nq_passages: int = 6
    max_prompt_tokens: int = 1800
    seed: int = 0
    checkpoint_every: int = 25
    dtype: str = "bfloat16"
    lora_layer_fraction: float = 0.5  # LoRA on the top half of the layers: the lower half runs without a backward
    squad_paragraphs: int = 5  # SQuAD training documents: this many consecutive paragraphs of the article
    calibration_fraction: float = 0.25  # SQuAD train questions held out of training to choose the threshold
    max_examples: int | None = None  # per source; for quick runs and tests


def gold_runs(sentences, gold: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive sentences that overlap a gold character span, as half-open index pairs."""
    hit = sorted({i for i, s in enumerate(sentences) for a, b in gold if s.start < b and a < s.end})
    runs: list[tuple[int, int]] = []
    for i in hit:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def build_items(tokenizer, template, config, examples, source: str, max_prompt_tokens: int,
                max_runs: int = 2) -> list[TrainItem]:
    """Training items for examples with one document each; a prompt that would need windowing is skipped."""
    from cfic.decoding.encode import plan_document

    items: list[TrainItem] = []
    eos = template.eos_ids[0]
    for ex in examples:
        if len(ex.documents) != 1:
            continue
        plan = plan_document(tokenizer, template, ex.documents[0], ex.id, {}, config, 10**9)
        q_ids = template.query_ids(tokenizer, ex.question, config.max_query_tokens)
        prompt = list(template.head_ids) + [t for seg in plan.segment_ids for t in seg] + q_ids
        if len(prompt) > max_prompt_tokens:
            continue
        if not ex.answerable:
            items.append(TrainItem(tuple(prompt), (eos,), source))
            continue
        runs = gold_runs(plan.sentences, [(a, b) for d, a, b in ex.gold if d == 0])
        for start, end in runs[:max_runs]:
            target = list(plan.answer_ids[start])
            for s in range(start + 1, end):
                target.extend(plan.segment_ids[s])
            items.append(TrainItem(tuple(prompt), (*target, eos), source))
    return items


def is_calibration_example(example_id: str, fraction: float) -> bool:
    """A stable, seed-independent share of the SQuAD training side that training never sees (threshold choice)."""
    digest = hashlib.sha256(example_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def squad_windows(examples, paragraphs: int, seed: int):
    """SQuAD articles are longer than a training prompt: each question gets ``paragraphs`` consecutive paragraphs
    (title line kept) that contain its gold sentences, or a seeded random run for an unanswerable question."""
    from cfic.eval.datasets import PASSAGE_SEPARATOR, Example

    rng = random.Random(seed)
    out = []
    for ex in examples:
        doc = ex.documents[0]
        head_end = doc.index("\n") + 1
        starts = [head_end]
        while (i := doc.find(PASSAGE_SEPARATOR, starts[-1])) != -1:
            starts.append(i + len(PASSAGE_SEPARATOR))
        ends = [s - len(PASSAGE_SEPARATOR) for s in starts[1:]] + [len(doc)]
        n = len(starts)
        if ex.gold:
            first = max(p for p in range(n) if starts[p] <= ex.gold[0][1])
            last = max(p for p in range(n) if starts[p] <= ex.gold[-1][1])
            if last - first + 1 > paragraphs:
                continue
            lo = rng.randint(max(0, last - paragraphs + 1), max(0, min(first, n - paragraphs)))
        else:
            lo = rng.randint(0, max(0, n - paragraphs))
        hi = min(n, lo + paragraphs) - 1
        shift = starts[lo] - head_end
        text = doc[:head_end] + doc[starts[lo]:ends[hi]]
        gold = tuple((0, a - shift, b - shift) for _, a, b in ex.gold)
        assert all(text[a:b] == doc[a + shift:b + shift] for _, a, b in gold)
        out.append(Example(ex.id, ex.question, ex.answers, (text,), gold, ex.answerable, f"{ex.doc_key}@{lo}"))
    return out


def training_items(tokenizer, template, config, settings: TrainSettings) -> list[TrainItem]:
    """All training-side items (minus the calibration hold-out), shuffled with the run's seed."""
    from cfic.eval import load_split

    rng = random.Random(settings.seed)
    limit = settings.max_examples
    nq = load_split("nq", "train", k=settings.nq_passages, seed=settings.seed, limit=limit)
    items = build_items(tokenizer, template, config, nq, "nq", settings.max_prompt_tokens)
    items += build_items(tokenizer, template, config, load_split("hotpotqa", "train", limit=limit), "hotpotqa",
                         settings.max_prompt_tokens)
    squad = [ex for ex in load_split("squad", "train", limit=limit)
             if not is_calibration_example(ex.id, settings.calibration_fraction)]
    items += build_items(tokenizer, template, config, squad_windows(squad, settings.squad_paragraphs, settings.seed),
                         "squad", settings.max_prompt_tokens)
    rng.shuffle(items)
    return items


def item_tensors(item: TrainItem):
    """input ids and labels: the loss falls on the target tokens only (HF shifts labels inside the model)."""
    import torch

    ids = list(item.prompt_ids) + list(item.target_ids)
    labels = [-100] * len(item.prompt_ids) + list(item.target_ids)
    return torch.tensor([ids]), torch.tensor([labels])


def lora_model(base, settings: TrainSettings):
    """LoRA on the top ``lora_layer_fraction`` of the layers. Why not all: below the lowest adapted layer no
    activation needs a gradient, so the backward pass stops there — half the layers measured 2x faster per item on
    the 2-core CPU, i.e. twice the examples in the same hour."""
    from peft import LoraConfig, get_peft_model

    n = base.config.num_hidden_layers
    top = max(1, min(n, math.ceil(n * settings.lora_layer_fraction)))
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(LORA_TARGETS), layers_to_transform=list(range(n - top, n)),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def learning_rate(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save_checkpoint(model, optimizer, step: int, losses: list[float], folder: Path) -> None:
    """Atomic: written to a temp folder, then renamed over the previous checkpoint."""
    import torch

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "losses": losses,
                "rng": torch.get_rng_state(), "py_rng": random.getstate()}, tmp / "trainer_state.pt")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def train(settings: TrainSettings, progress: bool = True, calibrate_after: bool = True) -> dict[str, Any]:
    """Run (or resume) training, then calibrate the threshold; returns a summary. The adapter lands in
    ``<out>/adapter`` (with ``cfic.json``, its calibrated threshold)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from cfic.config import GroundingConfig
    from cfic.decoding.encode import PromptTemplate
    from cfic.models import eos_token_ids, load_model

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(asdict(settings), indent=2))
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    loaded = load_model(settings.model, device="cpu", dtype="float32", adapter=None)
    tokenizer = loaded.tokenizer
    config = GroundingConfig()
    template = PromptTemplate.for_tokenizer(tokenizer, config.instruction, eos_token_ids(loaded.model, tokenizer))
    items = training_items(tokenizer, template, config, settings)
    if not items:
        raise CficError("no training items could be built")
    model = lora_model(loaded.model, settings)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=0.0)
    ckpt = out / "checkpoint"
    step, losses = 0, []
    if (ckpt / "trainer_state.pt").is_file():
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)  # never unpickle code
        set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        step, losses = state["step"], state["losses"]
        torch.set_rng_state(state["rng"])
        random.setstate(state["py_rng"])
    autocast = settings.dtype == "bfloat16"
    start = time.monotonic()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, initial=step, desc="cfic train", unit="step")
    stopped_early = False
    while step < settings.steps:
        if (time.monotonic() - start) / 60 > settings.max_minutes:
            stopped_early = True
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        optimizer.zero_grad(set_to_none=True)
        batch_loss = 0.0
        for j in range(settings.batch):
            item = items[(step * settings.batch + j) % len(items)]
            ids, labels = item_tensors(item)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=labels).loss / settings.batch
            loss.backward()
            batch_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        step += 1
        losses.append(batch_loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            _save_checkpoint(model, optimizer, step, losses, ckpt)
    if bar is not None:
        bar.close()
    _save_checkpoint(model, optimizer, step, losses, ckpt)
    adapter = out / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    model.save_pretrained(adapter)
    summary = {"steps": step, "planned_steps": settings.steps, "stopped_at_time_limit": stopped_early,
               "items": len(items), "items_by_source": {s: sum(i.source == s for i in items)
                                                        for s in sorted({i.source for i in items})},
               "examples_seen": step * settings.batch, "first_loss": losses[0] if losses else None,
               "last_loss_mean20": sum(losses[-20:]) / max(1, len(losses[-20:])),
               "minutes_this_run": (time.monotonic() - start) / 60, "settings": asdict(settings)}
    if calibrate_after:
        summary["calibration"] = calibrate(adapter, settings, progress)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def calibration_examples(settings: TrainSettings):
    """The SQuAD training-side questions that training left out, on the whole article (as ``cfic evaluate`` asks)."""
    from cfic.eval import load_split

    return [ex for ex in load_split("squad", "train", limit=settings.max_examples)
            if is_calibration_example(ex.id, settings.calibration_fraction)]


def choose_threshold(top_scores: list[float], answerable: list[bool]) -> dict[str, Any]:
    """The threshold that makes the most abstention decisions right (answer iff answerable); ties go to the lowest
    threshold (abstain as little as possible). A question is answered when its best span scores >= threshold."""
    if not top_scores:
        raise CficError("no calibration examples")
    candidates = sorted({0.0, *top_scores})
    n = len(top_scores)

    def accuracy(t: float) -> float:
        return sum((s >= t) == a for s, a in zip(top_scores, answerable, strict=True)) / n

    best = max(candidates, key=lambda t: (accuracy(t), -t))
    return {"threshold": best, "accuracy": accuracy(best), "accuracy_without_threshold": accuracy(0.0),
            "examples": n, "unanswerable": sum(not a for a in answerable)}


def calibrate(adapter: Path, settings: TrainSettings, progress: bool = True) -> dict[str, Any]:
    """Choose the adapter's default ``no_evidence`` threshold on the held-out training side; writes ``cfic.json``."""
    from tqdm.auto import tqdm

    from cfic.grounder import Grounder
    from cfic.models import ADAPTER_SETTINGS

    examples = calibration_examples(settings)
    grounder = Grounder.from_pretrained(settings.model, dtype="float32", adapter=adapter, threshold=None)
    encodings: dict[str, Any] = {}
    scores, answerable = [], []
    for ex in tqdm(examples, desc="calibrate threshold", unit="q", disable=not progress):
        if ex.doc_key not in encodings:
            encodings[ex.doc_key] = grounder.encode(list(ex.documents))
        result = grounder.ground(ex.question, encodings[ex.doc_key])
        scores.append(max((e.score for e in result.evidence), default=0.0))
        answerable.append(ex.answerable)
    chosen = choose_threshold(scores, answerable)
    chosen["source"] = "squad train split, questions held out of training (cfic.train.is_calibration_example)"
    (adapter / ADAPTER_SETTINGS).write_text(json.dumps(chosen, indent=2) + "\n")
    return chosen


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
    settings = TrainSettings(out=out, model=model, steps=steps, batch=batch, lr=lr, rank=rank,
                             alpha=2 * rank, max_minutes=max_minutes, nq_passages=nq_passages, seed=seed)
    if detach:
        Path(out).mkdir(parents=True, exist_ok=True)
        args = [a for a in sys.argv[1:] if a != "--detach"]
        log = open(Path(out) / "train.log", "ab")  # noqa: SIM115 - handed to the child process
        proc = subprocess.Popen([sys.executable, "-m", "cfic.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env=os.environ.copy())
        typer.echo(f"training in the background (pid {proc.pid}); log: {Path(out) / 'train.log'}; "
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

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

The optimisation is the shared loop (:mod:`cfic.training.loop`); the checkpoint is ``<out>/checkpoint.pt`` and the
time limit counts all runs of one folder together. This module imports no torch at import time.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from cfic.errors import CficError
from cfic.files import write_atomic
from cfic.training import loop

PARAMS_FILE = "swiftkv.safetensors"
CHECKPOINT = "checkpoint.pt"
# Settings a resumed run must share with the one that wrote the checkpoint (other values would mix two runs).
RESUME_KEYS = ("group", "q_rank", "seed", "passages", "answer_tokens")


@dataclass
class DistillSettings(loop.LoopSettings):
    out: str = "runs/swiftkv"
    steps: int = 300
    lr: float = 5e-4
    warmup: int = 10
    checkpoint_every: int = 10
    adapter: str | None = "auto"  # the weights inference runs (a PEFT folder, "auto": the bundled one, None)
    layer: int | None = None  # SwiftKV layer l (default: half the layers)
    group: int = 1  # AcrossKV group size
    q_rank: int = 16  # rank of the query correction (0: none)
    accumulate: int = 4  # prompts per optimizer step
    temperature: float = 2.0  # of the KL term (times T^2, as in SwiftKV)
    mse_weight: float = 1.0  # weight of the relative hidden-state MSE next to the KL
    passages: int = 10  # NQ passages per training document
    answer_tokens: int = 128  # teacher-forced continuation tokens per prompt: the loss rows
    gold_share: float = 0.75  # continuations that start at the gold sentence (else a random one)
    max_prompt_tokens: int = 2048  # prompt + continuation longer than this: skipped
    autocast: bool = True  # bfloat16 CPU autocast for teacher and student
    threads: int | None = None  # torch threads (default: torch's)
    limit: int | None = None  # training examples to read (for quick runs and tests)

    LR_FLOOR: ClassVar[float] = 0.1  # the parameters keep moving at the end: a long run should still improve


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


def _saved_run(path: Path, settings: DistillSettings, layer: int) -> dict[str, Any] | None:
    """The checkpoint in the run folder, refused when it was written with other settings."""
    import torch

    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=True)  # resuming never unpickles code from a folder that may not be yours
    for key in RESUME_KEYS:
        if saved["settings"][key] != getattr(settings, key):
            raise CficError(f"{path.parent} holds a run with {key}={saved['settings'][key]!r}; use another --out "
                            f"or the same {key}")
    if saved["settings"]["layer_resolved"] != layer:
        raise CficError(f"{path.parent} holds a run at layer {saved['settings']['layer_resolved']}; use another --out")
    return saved


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
    loop.seed_everything(settings.seed)
    if loaded is None:
        loaded = load_model(settings.model, device="cpu", dtype="float32", adapter=settings.adapter)
    model = loaded.model
    n_layers = len(model.model.layers)
    layer = settings.layer if settings.layer is not None else n_layers // 2
    if not 1 <= layer < n_layers:
        raise CficError(f"--layer must lie in [1, {n_layers - 1}] for a {n_layers}-layer model, got {layer}")
    ckpt_path = out / CHECKPOINT
    saved = _saved_run(ckpt_path, settings, layer)
    sw = SwiftKV(model, layer, settings.group, q_rank=settings.q_rank)
    sw.requires_grad_(True)
    sw.train()
    teacher = LayerRunner(model)
    student = LayerRunner(model, sw)
    optimizer = loop.adamw(list(sw.parameters()), settings.lr)
    state = loop.LoopState()
    if saved is not None:
        sw.load_state_dict(saved["params"])
        state.restore(optimizer, saved)
        state.history, state.minutes_before = saved["history"], saved["minutes"]
    config = GroundingConfig()
    template = PromptTemplate.for_tokenizer(loaded.tokenizer, config.instruction,
                                            eos_token_ids(model, loaded.tokenizer))
    items = distill_items(loaded.tokenizer, template, config, settings)
    if not items:
        raise CficError("no distillation items could be built from the training split")
    info_base = {"model": loaded.name, "adapter": loaded.adapter, "settings": asdict(settings) | {"layer": layer}}

    def checkpoint(final: bool) -> None:
        content = state.snapshot(optimizer) | {
            "params": sw.state_dict(), "history": state.history, "minutes": state.minutes(),
            "settings": asdict(settings) | {"layer_resolved": layer}}
        write_atomic(ckpt_path, lambda tmp: torch.save(content, tmp))
        info = info_base | {"steps": state.step, "minutes": round(state.minutes(), 2), "final": final,
                            "kl_last10": loop.recent_mean(state.history, "kl", 10),
                            "kl_first": state.history[0]["kl"] if state.history else None}
        sw.save(out / PARAMS_FILE, model_name=loaded.name, info=info)

    def item_loss(item: DistillItem):
        loss, kl, mse = distill_loss(teacher, student, item, settings)
        return loss, {"kl": kl, "mse": mse}

    def log_step(record: dict[str, float]) -> None:
        with (out / "history.jsonl").open("a", encoding="utf-8") as fh:  # append-only: a cut line is harmless
            fh.write(json.dumps(record) + "\n")

    stopped = loop.run(settings, state, optimizer, items, item_loss, checkpoint, accumulate=settings.accumulate,
                       autocast=settings.autocast, desc="distill-swiftkv", progress=progress, on_step=log_step)
    history = state.history
    summary = {"params": str(out / PARAMS_FILE), "steps": state.step, "planned_steps": settings.steps,
               "stopped_by": stopped, "minutes_total": round(state.minutes(), 2), "items": len(items),
               "examples_seen": state.step * settings.accumulate, "layer": layer, "group": settings.group,
               "kl_first_step": history[0]["kl"] if history else None,
               "kl_last10": loop.recent_mean(history, "kl", 10),
               "bytes": (out / PARAMS_FILE).stat().st_size, "model": loaded.name, "adapter": loaded.adapter,
               "torch_threads": torch.get_num_threads()}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary

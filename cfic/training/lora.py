"""``cfic train``: LoRA supervised fine-tuning that teaches the LM the CFIC task.

Why: zero-shot, a 135M instruct model rarely starts its answer with the right sentence, and its end-of-evidence
probability means little. CFIC trains on (document, question, evidence) with the evidence followed by the
end-of-sequence token and the loss on those tokens only (:mod:`cfic.training.lora_items`). The optimisation is the
shared loop (:mod:`cfic.training.loop`); afterwards the adapter's threshold is calibrated
(:mod:`cfic.training.calibration`).

The checkpoint is the folder ``<out>/checkpoint``: the PEFT adapter files plus ``trainer_state.pt`` (optimizer,
step, losses, RNG states), replaced as a whole; the finished adapter lands in ``<out>/adapter``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cfic.errors import CficError
from cfic.files import previous_folder, write_atomic, write_folder_atomic
from cfic.training import loop
from cfic.training.calibration import calibrate
from cfic.training.lora_items import item_tensors, training_items

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAINER_STATE = "trainer_state.pt"


@dataclass
class TrainSettings(loop.LoopSettings):
    out: str = "runs/train"
    steps: int = 165  # the shipped adapter's run: the cosine reaches zero as the hour ends
    lr: float = 3e-4
    warmup: int = 30
    checkpoint_every: int = 25
    batch: int = 4  # items per optimizer step (gradient accumulation: one item per forward)
    rank: int = 16  # LoRA rank
    alpha: int = 32  # LoRA alpha (the CLI sets 2 x rank)
    dropout: float = 0.05  # LoRA dropout
    nq_passages: int = 6  # passages per NQ training document
    max_prompt_tokens: int = 1800  # longer prompts would need windowing at inference: skipped
    dtype: str = "bfloat16"  # "bfloat16": the forward runs under CPU autocast
    lora_layer_fraction: float = 0.5  # LoRA on the top half of the layers: the lower half runs without a backward
    squad_paragraphs: int = 5  # SQuAD training documents: this many consecutive paragraphs of the article
    calibration_fraction: float = 0.25  # SQuAD train questions held out of training to choose the threshold
    max_examples: int | None = None  # per source; for quick runs and tests


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


def _save_checkpoint(model, optimizer, state: loop.LoopState, folder: Path) -> None:
    """Adapter weights and trainer state, as one folder that replaces the previous checkpoint atomically."""
    import torch

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        saved = state.snapshot(optimizer) | {"losses": [h["loss"] for h in state.history]}
        torch.save(saved, tmp / TRAINER_STATE)

    write_folder_atomic(folder, fill)


def _resume(model, optimizer, folder: Path) -> loop.LoopState:
    """The state of the checkpoint in ``folder`` (a fresh one when there is none). Each run has its own time limit,
    so minutes of earlier runs do not count."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = loop.LoopState()
    if not (folder / TRAINER_STATE).is_file():  # a kill between write_folder_atomic's two renames
        folder = previous_folder(folder) or folder
    if (folder / TRAINER_STATE).is_file():
        saved = torch.load(folder / TRAINER_STATE, weights_only=True)  # never unpickle code
        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        state.restore(optimizer, saved)
        state.history = [{"step": i + 1, "loss": loss} for i, loss in enumerate(saved["losses"])]
    return state


def train(settings: TrainSettings, progress: bool = True, calibrate_after: bool = True) -> dict[str, Any]:
    """Run (or resume) training, then calibrate the threshold; returns a summary. The adapter lands in
    ``<out>/adapter`` (with ``cfic.json``, its calibrated threshold)."""
    from cfic.config import GroundingConfig
    from cfic.decoding.encode import PromptTemplate
    from cfic.models import eos_token_ids, load_model

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "settings.json", json.dumps(asdict(settings), indent=2))
    loop.seed_everything(settings.seed)
    loaded = load_model(settings.model, device="cpu", dtype="float32", adapter=None)
    tokenizer = loaded.tokenizer
    config = GroundingConfig()
    template = PromptTemplate.for_tokenizer(tokenizer, config.instruction, eos_token_ids(loaded.model, tokenizer))
    items = training_items(tokenizer, template, config, settings)
    if not items:
        raise CficError("no training items could be built")
    model = lora_model(loaded.model, settings)
    model.train()
    optimizer = loop.adamw([p for p in model.parameters() if p.requires_grad], settings.lr)
    ckpt = out / "checkpoint"
    state = _resume(model, optimizer, ckpt)

    def item_loss(item):
        ids, labels = item_tensors(item)
        loss = model(input_ids=ids, labels=labels).loss
        return loss, {"loss": loss}

    stopped = loop.run(settings, state, optimizer, items, item_loss,
                       lambda final: _save_checkpoint(model, optimizer, state, ckpt),
                       accumulate=settings.batch, autocast=settings.dtype == "bfloat16", desc="cfic train",
                       progress=progress)
    adapter = out / "adapter"
    write_folder_atomic(adapter, model.save_pretrained)
    losses = [h["loss"] for h in state.history]
    summary = {"steps": state.step, "planned_steps": settings.steps, "stopped_at_time_limit": stopped != "steps",
               "items": len(items), "items_by_source": {s: sum(i.source == s for i in items)
                                                        for s in sorted({i.source for i in items})},
               "examples_seen": state.step * settings.batch, "first_loss": losses[0] if losses else None,
               "last_loss_mean20": loop.recent_mean(state.history, "loss"),
               "minutes_this_run": state.minutes(), "settings": asdict(settings)}
    if calibrate_after:
        summary["calibration"] = calibrate(adapter, settings, progress)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary

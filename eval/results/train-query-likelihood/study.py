"""Training-side study: does the LM's question likelihood given a paragraph (UPR, Sachan et al. 2022) rank the
answer paragraph better than the sentence prior?  NQ train questions after fit-prior's (offset 460), HotpotQA and
SQuAD train.  Writes per-question scores to an npz folder (resumable); analyse.py scores them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cfic import Grounder
from cfic.eval import load_split
from cfic.eval.metrics import contains_answer
from cfic.prior import SentencePrior, paragraph_bounds
from cfic.question_likelihood import best_paragraphs, question_log_likelihoods

OUT = Path(__file__).parent / "material"
TOP_M = 8
PROMPTS = ("upr",)  # cfic.question_likelihood's PASSAGE_PROMPT (the study came first; the product reuses it)


def main(source: str, n: int, offset: int) -> None:
    grounder = Grounder.from_pretrained()
    model, tok = grounder.loaded.model, grounder.tokenizer
    examples = load_split(source, "train")[offset: offset + n]
    folder = OUT / source
    folder.mkdir(parents=True, exist_ok=True)
    for i, ex in enumerate(tqdm(examples, desc=source)):
        path = folder / f"{i:04d}.npz"
        if path.exists():
            continue
        doc = ex.documents[0]
        plan = grounder.plan([doc])[0]
        signals = grounder._signals(ex.question, [plan])
        log_prior = SentencePrior.log_priors(signals, grounder.config.prior)[0]
        para_of = plan.features.paragraph_of
        bounds = paragraph_bounds(doc)
        answer = np.array([contains_answer(s.text, ex.answers) for s in plan.sentences], dtype=bool)
        gold = np.zeros(len(plan.sentences), dtype=bool)
        for d, a, b in ex.gold:
            if d == 0:
                gold |= np.array([s.start < b and a < s.end for s in plan.sentences])
        top = np.array([j for _, j in best_paragraphs([log_prior], [para_of], TOP_M)])
        texts = [doc[bounds[j][0]: bounds[j][1]].strip() for j in top]
        scores = {name: question_log_likelihoods(model, tok, texts, ex.question, 400) for name in PROMPTS}
        np.savez(path, log_prior=log_prior, para_of=para_of, top=top, answer=answer, gold=gold,
                 **{f"ql_{k}": v for k, v in scores.items()})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

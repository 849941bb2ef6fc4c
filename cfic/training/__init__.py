"""Everything that learns from the training side of the bundled data (the evaluation splits are never read).

- :mod:`cfic.training.loop`: the one optimisation loop, learning-rate schedule, checkpoint core and time limit that
  both gradient-trained jobs run, so a fix to resuming or to the schedule reaches both;
- :mod:`cfic.training.lora` (``cfic train``): the LoRA adapter, with :mod:`cfic.training.lora_items` (its data) and
  :mod:`cfic.training.calibration` (the adapter's ``no_evidence`` threshold);
- :mod:`cfic.training.distill` (``cfic distill-swiftkv``): SwiftKV parameters against the unmodified model;
- :mod:`cfic.training.fit_prior` / :mod:`cfic.training.fit_abstention` (``cfic fit-prior`` / ``fit-abstention``):
  closed-form and grid fits of the sentence prior and the abstention model (its material:
  :mod:`cfic.training.abstention_data`, scored held out by SQuAD article);
- :mod:`cfic.training.commands`: the command-line entry points of all four.

No module here imports torch at import time (the CLI registers the commands without loading it).
"""

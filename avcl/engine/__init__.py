"""Layer ``engine``: one run; imports every layer below it (``core`` ... ``config``).

* ``trainer``: the one training loop; ``runner``: every method of a recipe through the same scenario,
  checkpointed after every task and resumable; ``init_stage``: the model every pre-training method starts
  from; ``checks``: what is refused before a run directory is written;
* the run directory: ``events`` (events.jsonl), ``loggers`` (epochs.csv, tasks.csv, TensorBoard,
  environment.json), ``progress`` (start-up lines and the progress bar), ``peak_memory``.
"""

"""Layer ``eval``: measuring a model; imports ``core`` and ``parallel`` (evaluation is sharded across ranks).

* ``protocols``: what is measured after every task, the one pluggable part of a run (``eval.protocol``:
  accuracy, retrieval, probe);
* ``evaluator``: class-incremental (TAg) and task-aware (TAw) accuracy; ``metrics``: average incremental
  accuracy, forgetting, BWT; ``retrieval``: audio-video retrieval and its forgetting; ``probe``: linear probes.
"""

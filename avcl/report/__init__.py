"""Layer ``report``: presenting a run directory, never training; imports ``core`` and ``eval`` (the protocols'
table columns).

* ``tables``: the results table of a run (mean ± std over seeds), the expected numbers of a recipe;
* ``html``: one self-contained HTML page of a run, or of several runs side by side;
* ``plots``: accuracy curves and matrices, retrieval curves.
"""

"""Layer ``apps``: programs built on the engine; imports every layer below it (``core`` ... ``engine``).

* ``sweep``: many runs at once (``seeds=[...]``, ``avcl run --jobs N``);
* ``tune``: ``avcl tune``, a hyperparameter search on validation data;
* ``extract``: ``avcl extract``, video files to feature or raw-clip stores;
* ``avdigits_videos``: AV-Digits written out as real video files.
"""

"""Layer ``core``: what every other layer uses; imports only torch, numpy and the standard library.

* ``errors``: AvclError, the user's-input error the CLI prints as one line;
* ``samples``: Samples (a dict of tensors sharing the first dimension), select, concat, batches, to_device;
* ``io``: atomic file writes, file hashes;
* ``rng``: seeding and the state of every random generator (checkpointed);
* ``device``: the device a run trains on, its autocast, the CPU allocator setting;
* ``options``: config fields that declare their range or choices, and the one checker that reads them.
"""

"""Layer ``memory``: what a method remembers; imports ``core`` and ``parallel``.

* ``buffer``: the exemplar memory (a fixed budget shared equally by the classes seen; random or herding);
* ``reservoir``: the task-free reservoir of the label-free methods;
* ``sharding``: one reservoir per rank with several processes, and their checkpointing.
"""

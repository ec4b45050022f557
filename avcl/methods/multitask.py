"""Multitask upper bound (STELLA's ``commands/cav_pretrain_*_base_multitask.sh``): fine-tuning on the union of all tasks.

``single_task = True``: the runner trains the method once, on one task made of every task's
training data, with the same epochs, batch, optimizer and initial weights as the continual
runs (so it sees the same number of sample presentations), and evaluates after it. The loss is
finetune's: the CAV-MAE loss for label-free models, cross-entropy over all classes for
classifier models. No deviation from the STELLA code.
"""
from avcl.methods import register
from avcl.methods.finetune import Finetune


@register
class Multitask(Finetune):
    name = "multitask"
    description = "fine-tuning once on the union of all tasks (i.i.d. upper bound)"
    single_task = True

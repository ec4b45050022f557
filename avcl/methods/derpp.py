"""DER++ on a label-free model (the STELLA code's ``models/cl_methods/der_pp.py``): ER plus a "dark knowledge" penalty.

Per step: draw ``train.replay_batch_size`` stored rows with their stored embeddings
``z_audio``/``z_video``; one CAV-MAE forward on [current; replay] gives the loss L and the
unimodal embeddings (``ssl_loss``'s ``z_*``: token means of the masked input's fusion
outputs) of every row. Loss = L + alpha * (MSE(z_a[replay], stored z_a) + MSE(z_v[replay],
stored z_v)), each mean over B_r x D elements (0 while the memory is empty). The current rows
are then offered with their own ``z_*`` from this same forward, detached (before the update).

Deviations: none from the STELLA code beyond ER's (the reservoir is stored on the training
device). As we read the code, the stored target was computed under another random mask, so the
penalty has a noise floor. The embeddings are stored in the dtype the forward returns them
(float32 after the modality LayerNorm, also under bf16 autocast; the code: fp16 autocast outputs).
"""
from dataclasses import dataclass

from avcl.methods import register
from avcl.methods.base import Hparams
from avcl.methods.replay_ssl import LabelFreeMethod, draw, joined, prepare_current, ssl_terms
from avcl.nn.cl_losses import embedding_mse


@dataclass
class DERppHparams(Hparams):
    alpha: float = 0.5  # weight of each modality's embedding MSE on the replayed rows


@register
class DERpp(LabelFreeMethod):
    name = "derpp"
    description = "DER++: ER plus MSE of replayed rows' embeddings to those stored at insertion (label-free)"
    Hparams = DERppHparams

    def training_loss(self, batch):
        x = prepare_current(self.model, batch)
        _, replay = draw(self.memory, self.cfg.train.replay_batch_size)
        out = self.model.ssl_loss(joined(x, replay))
        current = len(x["audio"])
        loss = out["loss"]
        self.log_terms(**ssl_terms(out))
        if replay is not None:
            der = (embedding_mse(out["z_audio"][current:], replay["z_audio"])
                   + embedding_mse(out["z_video"][current:], replay["z_video"]))
            self.log_terms(der=der)
            loss = loss + self.hp.alpha * der
        self.memory.add({**x, "z_audio": out["z_audio"][:current].detach(),
                         "z_video": out["z_video"][:current].detach()})
        return loss

"""kdkernels: fused knowledge-distillation losses for large-vocabulary language models.

    import kdkernels as kd
    loss = kd.kd_loss(student_logits, teacher_logits, temperature=2.0)
"""

from .functional import kd_loss, kl_div, log_softmax, softmax
from .linear import linear_kd_loss
from .modules import KDLoss, KLDivLoss, LinearKDLoss, SparseKDLoss
from .sparse import sparse_kd_loss, topk_logprobs

__all__ = ["kd_loss", "kl_div", "softmax", "log_softmax", "KDLoss", "KLDivLoss",
           "linear_kd_loss", "LinearKDLoss", "sparse_kd_loss", "SparseKDLoss", "topk_logprobs"]
__version__ = "0.1.0"

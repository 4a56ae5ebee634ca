"""Adapters that plug kdkernels into training libraries users already run.

    kdkernels.integrations.trl   generalized_jsd_loss, a drop-in for TRL's
                                 GKDTrainer.generalized_jsd_loss

Each adapter imports only torch and kdkernels: the library it adapts to is not needed to
call it (tests compare against that library when it is installed).
"""

"""dkd-jax: DKDFMH (head-fusion attention CNN + Decoupled Knowledge Distillation) in JAX/Flax.

Modules (one responsibility each):
  losses        pure DKD / KD / CE losses, per-example, jittable
  metrics       pure confusion matrix, WA, UA, per-class scores
  audio         pure NumPy feature front end (log-mel, MFCC)
  records       the one TFRecord schema shared by writer and reader
  models        Flax MACNN (head-fusion attention) and area attention
  train_lib     train state, pmap'ed steps, teacher and student loops
  eval_lib      utterance aggregation, reports, prediction
"""

__version__ = "0.1.0"

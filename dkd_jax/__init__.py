"""dkd-jax: DKDFMH (head-fusion attention CNN + Decoupled Knowledge Distillation) in JAX/Flax.

Modules (one responsibility each):
  losses        pure DKD / KD / CE losses, per-example, jittable
  metrics       pure confusion matrix, WA, UA, per-class scores
  audio         pure NumPy feature front end (log-mel, MFCC)
  records       the one TFRecord schema shared by writer and reader
  models        Flax MACNN (head-fusion attention); area_attention: multi-scale area attention
  config        typed run configs and presets; protocols: train/test splits
  input_pipeline, checkpointing  batches and normalisation; orbax save/restore
  train_lib     train state, pmap'ed steps, teacher and student loops
  eval_lib      utterance aggregation, reports, prediction
  experiment    whole experiments (folds x seeds x models) and summaries; demo: the README demo
  export        a run -> ONNX / StableHLO folder with model.json (optional extra .[export])
  deploy, streaming  prediction from an exported folder with onnxruntime, without JAX
"""

__version__ = "0.1.0"

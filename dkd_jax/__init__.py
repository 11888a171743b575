"""dkd-jax: DKDFMH (head-fusion attention CNN + Decoupled Knowledge Distillation) in JAX/Flax.

Modules (one responsibility each):
  losses, metrics      pure DKD / KD / CE losses; confusion matrix, WA, UA
  audio, records       the NumPy feature front end; the one TFRecord schema
  models               Flax MACNN (head fusion); area_attention: multi-scale area attention
  config, protocols    typed run configs and presets; train/test splits
  input_pipeline       a run's data: training arrays, held-out sets, normalisation, batches
  train_lib            train_and_evaluate as named phases; train_step: the compiled pmap step;
                       train_state: state and optimiser; objective: loss weights and terms;
                       train_loop: logging, evaluation and checkpoint cadence
  run_dir              every file of a run directory, the workdir lock, restore_run;
                       checkpointing: thin orbax wrapper; jsonio: atomic JSON files
  distributed          multi-host start-up, cross-process reductions, replication
  host_memory          glibc allocator settings the command lines apply (faster CPU steps)
  eval_lib             the one scoring path, reports; predict: audio files; provenance
  experiment           whole experiments (folds x seeds x models), summaries, reproduce
  demo                 the README demo; cli_args: argument types of the command lines
  export               a run -> ONNX / StableHLO folder with model.json (extra .[export])
  deploy, streaming    prediction from an exported folder with onnxruntime, without JAX
"""

__version__ = "0.1.0"

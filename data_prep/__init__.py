"""data_prep: the offline step that turns a speech corpus into TFRecord shards of segments.

Sources: IEMOCAP release layout and EmoDB (:mod:`data_prep.sources`), CSV manifests
(:mod:`data_prep.manifest`: schema, labels, duplicate checks), and a synthetic IEMOCAP-layout
corpus (:mod:`data_prep.synth`). Entry points: ``python -m data_prep`` / ``dkd-data-prep``
(:mod:`data_prep.cli`) and :func:`prepare` (:mod:`data_prep.pipeline`, with the inputs' SHA-256
in :mod:`data_prep.inputs` and the printed summary in :mod:`data_prep.summary`); the feature
processes are :mod:`data_prep.workers`. The output schema and its reader live in
:mod:`dkd_jax.records`; features and segmentation in :mod:`dkd_jax.audio`.
"""

from data_prep.pipeline import prepare, resolve_feature_config, scan
from data_prep.sources import PrepError, Scan, Utterance
from data_prep.summary import prep_summary

__all__ = [
    "PrepError",
    "Scan",
    "Utterance",
    "prep_summary",
    "prepare",
    "resolve_feature_config",
    "scan",
]

"""The few lines a finished prep run prints: counts, what was left out, and the warnings a user
must see (an empty class, many skipped files, files cut short, dominant utterances)."""

from __future__ import annotations

import collections

from data_prep import sources
from dkd_jax import audio

__all__ = ["prep_summary"]

#: What a corpus's own label codes mean, for the "excluded" line (``label:A`` says little).
_CODE_NAMES = {
    "emodb": sources.EMODB_LABELS,
    "iemocap": {
        **{k: v for k, v in sources.IEMOCAP_LABELS.items() if v},
        "xxx": "no majority label",
        "hap": "happiness, see --happy",  # left out only by the --happy choice
        "exc": "excited, see --happy",
    },
}


def _excluded_name(corpus: str, key: str) -> str:
    """``label:A`` → ``label:A (fearful)`` for a corpus whose codes are known."""
    kind, _, code = key.partition(":")
    name = _CODE_NAMES.get(corpus, {}).get(code) if kind == "label" else None
    return f"{key} ({name})" if name and name != code else key


#: Skip kinds that name a folder or a line, not an utterance (not counted as skipped ones).
NOT_UTTERANCES = frozenset(
    {
        "missing_session",
        "missing_labels",
        "missing_audio",
        "malformed_label_line",
        "duplicate_label_line",
    }
)


def _single_session_classes(meta: dict) -> dict[str, str]:
    """{class: its one session} for classes whose utterances all come from one session, when
    the prep has several sessions."""
    names = list(meta.get("label_names", ()))
    sessions: dict[int, set[str]] = {}
    for u in meta.get("utterances", ()):
        sessions.setdefault(int(u["label"]), set()).add(str(u["session"]))
    if len(set().union(*sessions.values()) if sessions else ()) < 2:
        return {}
    return {
        names[label]: next(iter(held))
        for label, held in sorted(sessions.items())
        if len(held) == 1 and label < len(names)
    }


def prep_summary(meta: dict) -> str:
    """A few human-readable lines about a finished prep run."""
    c = meta["counts"]
    lines = [
        f"{meta['corpus']}: {c['utterances']} utterances ({c['duration_s'] / 3600:.2f} h), "
        f"segments train {c['segments']['train']} / eval {c['segments']['eval']}, "
        f"shape {meta['segment_shape']}, {meta['num_shards']} shard(s) per split",
        "  by class: " + ", ".join(f"{k} {v}" for k, v in c["by_class"].items()),
        "  by session: " + ", ".join(f"{k} {v}" for k, v in c["by_session"].items()),
        f"  short utterances: {c['short_padded']} padded, {c['short_dropped']} dropped",
    ]
    if c["excluded"]:
        named = (f"{_excluded_name(meta['corpus'], k)} {v}" for k, v in c["excluded"].items())
        lines.append("  excluded: " + ", ".join(named))
    if c["skipped"]:
        lines.append(
            "  skipped: "
            + ", ".join(f"{k} {v}" for k, v in c["skipped"].items())
            + " (each listed with its reason in metadata.json)"
        )
    empty = [name for name, n in c["by_class"].items() if n == 0]
    if empty:
        kept = [name for name, n in c["by_class"].items() if n]
        it = "it" if len(empty) == 1 else "them"
        if len(kept) >= 2:
            fix = f" or leave {it} out with --classes {','.join(kept)}"
        else:  # --classes of one class is refused: a classifier needs two
            fix = f"; training needs utterances of at least 2 classes ({len(kept)} now)"
        lines.append(
            f"  warning: no utterance of class {', '.join(empty)}: a model cannot learn {it} and "
            f"UA scores {it} 0; fix the rows (skipped and excluded above){fix}"
        )
    lonely = _single_session_classes(meta)
    if lonely:
        listed = ", ".join(f"{name} (only in {session})" for name, session in lonely.items())
        lines.append(
            f"  warning: class {listed}: a leave-one-session-out fold holding that session out "
            "trains without it (train.py names such folds)"
        )
    cut = [r["utterance_id"] for r in meta.get("utterances", ()) if "warning" in r]
    if cut:
        lines.append(
            f"  warning: {len(cut)} file(s) were cut short or damaged: they decode less audio than "
            f"they declare, or stop without their end (e.g. {cut[0]}); kept with what they "
            'hold, each with a "warning" in metadata.json'
        )
    tiny = [r for r in meta.get("utterances", ()) if r["duration_s"] < audio.MIN_RELIABLE_SECONDS]
    if tiny:
        least = min(tiny, key=lambda r: r["duration_s"])
        lines.append(
            f"  warning: {len(tiny)} utterance(s) last under {audio.MIN_RELIABLE_SECONDS} s "
            f"(shortest: {least['utterance_id']}, {least['duration_s']:.3f} s): padded to a whole "
            "window, they hold next to no speech for their label; check or leave them out"
        )
    low = [r for r in meta.get("utterances", ()) if "source_rate" in r]
    if low:
        rates = collections.Counter(r["source_rate"] for r in low)
        classes = collections.Counter(r["label_name"] for r in low)
        target = meta["feature_config"]["sample_rate"]
        lines.append(
            f"  warning: {len(low)} of {c['utterances']} utterances were recorded below the "
            f"features' {target} Hz ("
            + ", ".join(f"{rate} Hz: {n}" for rate, n in sorted(rates.items()))
            + "; by class: "
            + ", ".join(f"{name} {n}" for name, n in sorted(classes.items()))
            + f"): nothing above {min(rates) // 2} Hz reaches their features; where the rate "
            "goes with a class or a speaker, a model can learn the recording channel instead of "
            'the emotion (each has "source_rate" in metadata.json)'
        )
    loud = [r for r in meta.get("utterances", ()) if "clipped" in r]
    if loud:
        top = max(loud, key=lambda r: r["clipped"]["peak"])
        lines.append(
            f"  warning: {len(loud)} float file(s) go beyond full scale and were clipped to ±1 "
            f"(loudest: {top['utterance_id']}, peak {top['clipped']['peak']:g}, "
            f"{top['clipped']['samples']} samples clipped); their features hold the distortion: "
            'scale them down (e.g. by their peak) and prepare again; each has "clipped" in '
            "metadata.json"
        )
    num_skipped = sum(n for k, n in c["skipped"].items() if k not in NOT_UTTERANCES)
    if num_skipped > 0.1 * (num_skipped + c["utterances"]):
        lines.append(
            f"  warning: {num_skipped} of {num_skipped + c['utterances']} utterances were "
            "skipped (reasons in metadata.json)"
        )
    balance = meta.get("segment_balance") or {}
    if balance.get("capped_utterances"):
        lines.append(
            f"  capped: {balance['capped_utterances']} utterance(s) at "
            f"{balance['max_segments_per_utterance']} train segments "
            f"({balance['segments_removed_by_cap']} segments left out)"
        )
    if balance.get("dominant"):
        top = balance["dominant"][0]
        lines.append(
            f"  warning: {len(balance['dominant'])} utterance(s) supply more than "
            f"{100 * balance['max_utterance_share']:.0f} % of the train segments each (largest: "
            f"{top['utterance_id']}, {100 * top['share']:.0f} %); see --max-segments-per-utterance"
        )
    lines.append(f"  content hash {meta['content_hash']}")
    return "\n".join(lines)

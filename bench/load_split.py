"""Reading a prep directory: ``records.load_split`` throughput, segments/s and MiB/s.

    python bench/load_split.py PREP_DIR [--repeats 3] [--no-verify] [--out FILE]

Reads each layout (``train``, ``eval``) ``--repeats`` times in a row. The first read of a split
that is not in the page cache is bounded by the disk; later ones measure the decoder (TFRecord
framing, both CRCs, the tf.train.Example parse, the copy into one array). The load average is
recorded; the JSON is printed, and written only with ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchjson

from dkd_jax import records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("prep_dir")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-verify", action="store_true", help="skip the CRC checks")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    benchjson.check_out(p, args.out)
    try:
        meta = records.load_metadata(args.prep_dir)
    except records.DataError as e:
        print(f"load_split: error: {e}", file=sys.stderr)
        return 2
    report = {
        "prep_dir": os.path.abspath(args.prep_dir),
        "segment_shape": meta["segment_shape"],
        "verify_crc": not args.no_verify,
        "loadavg_before": os.getloadavg(),
        "splits": {},
    }
    for split in sorted(meta["splits"]):
        reads = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            arrays = records.load_split(args.prep_dir, split, verify=not args.no_verify)
            seconds = time.perf_counter() - t0
            mib = arrays.features.nbytes / 2**20
            reads.append(
                {
                    "seconds": round(seconds, 3),
                    "segments_per_s": round(len(arrays) / seconds),
                    "feature_mib_per_s": round(mib / seconds, 1),
                }
            )
        report["splits"][split] = {
            "segments": len(arrays),
            "feature_mib": round(mib, 1),
            "reads": reads,
            "median_segments_per_s": statistics.median(r["segments_per_s"] for r in reads),
        }
    report["loadavg_after"] = os.getloadavg()
    return benchjson.emit(report, args.out, command=benchjson.command_line("load_split.py", argv))


if __name__ == "__main__":
    sys.exit(main())

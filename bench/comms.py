"""`python -m bench comms`: upload bytes and accuracy for answers in float32, float16, uint8 and
one-byte votes, against FedAvg's model bytes."""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import NO_BASELINES, header, run_row, run_variant


def comms(out: Path, overrides: dict) -> dict:
    """Bytes up per client-round vs accuracy for each answer encoding, against FedAvg's model bytes."""
    base = {**NO_BASELINES, **overrides}
    encodings = str(base.pop("encodings", "float16,vote,uint8,float32")).split(",")
    # float16 is the fleet's default: the privacy suite's "non-private" run, shared like "fedavg"
    rows = {
        dtype: run_row(
            run_variant(out, "non-private" if dtype == "float16" else dtype, {**base, "distill.answer_dtype": dtype})
        )
        for dtype in dict.fromkeys(["float16", *encodings])
    }
    fedavg = run_row(run_variant(out, "fedavg", {**base, "method": "fedavg"}))
    for row in rows.values():
        row["fedavg_bytes_over_these"] = fedavg["bytes_per_client_round"] / row["bytes_per_client_round"]
        row["accuracy_cost_points_vs_float16"] = 100 * (rows["float16"]["accuracy"] - row["accuracy"])
    summary = {
        **header("comms", overrides),
        "rounds": fedavg["rounds_run"],
        "fedavg": fedavg,
        "encodings": rows,
    }
    (out / "comms.json").write_text(json.dumps(summary, indent=2))
    return summary

"""The pair policy: which scored videos become (winner, loser) pairs, and why the others did not.

Scores are geometry errors E (lower is better). Videos scored under different `metric_id`s are
never paired; failed, unscorable, static and (with `max_score`) low-quality videos are dropped.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter, defaultdict

from training.mining.config import PairConfig


def select_pairs(records: list[dict], settings: PairConfig) -> tuple[list[tuple[dict, dict]], dict]:
    """Rank each prompt's usable videos by score (lower is better) and pair them.

    Returns (pairs as (winner, loser) records, report). Videos are dropped as failed, unscorable,
    static (motion < min_motion) or low_quality (score > max_score); a prompt with fewer than two
    usable videos of one metric_id yields nothing; a candidate pair whose gap is below min_gap is
    dropped as small_gap. Videos scored under different metric_ids are never paired.
    """
    dropped_videos: Counter = Counter()
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for rec in records:
        status = rec.get("status")
        if status == "failed":
            dropped_videos["failed"] += 1
        elif status != "ok" or rec.get("score") is None or not math.isfinite(rec["score"]):
            dropped_videos["unscorable"] += 1
        elif rec.get("motion") is None or rec["motion"] < settings.min_motion:
            dropped_videos["static"] += 1
        elif settings.max_score is not None and rec["score"] > settings.max_score:
            dropped_videos["low_quality"] += 1
        else:
            groups[(rec["prompt_id"], rec.get("metric_id") or "")].append(rec)
    pairs: list[tuple[dict, dict]] = []
    dropped_pairs: Counter = Counter()
    prompts_with_pairs: set[str] = set()
    for (prompt_id, _), group in sorted(groups.items()):
        group.sort(key=lambda r: (r["score"], r["seed"]))
        if len(group) < 2:
            dropped_pairs["single_candidate"] += 1
            continue
        if settings.mode == "best-vs-worst":
            candidates = [(group[0], group[-1])]
        else:
            candidates = [(group[i], group[j]) for i in range(len(group)) for j in range(i + 1, len(group))]
        for winner, loser in candidates:
            if loser["score"] - winner["score"] >= settings.min_gap and loser["score"] > winner["score"]:
                pairs.append((winner, loser))
                prompts_with_pairs.add(prompt_id)
            else:
                dropped_pairs["small_gap"] += 1
    gaps = [l["score"] - w["score"] for w, l in pairs]
    report = {
        "videos": len(records),
        "videos_kept": sum(len(g) for g in groups.values()),
        "videos_dropped": dict(sorted(dropped_videos.items())),
        "prompts": len({r["prompt_id"] for r in records}),
        "prompts_with_pairs": len(prompts_with_pairs),
        "pairs": len(pairs),
        "pairs_dropped": dict(sorted(dropped_pairs.items())),
        "gap_histogram": _histogram(gaps),
        "metric_ids": sorted({m for _, m in groups}),
    }
    return pairs, report


def _histogram(values: list[float], bins: int = 10) -> dict:
    import numpy as np

    if not values:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(np.asarray(values, dtype=float), bins=bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def pair_id(winner: dict, loser: dict) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", winner["prompt_id"])[:48]
    digest = hashlib.sha1(f"{winner['prompt_id']}:{winner['seed']}:{loser['seed']}".encode()).hexdigest()[:10]
    return f"{safe}-{digest}"

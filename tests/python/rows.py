"""What the KServe client scripts check of their answers: each client's output row
against the direct answers for every text. Imported by kserve_*_clients.py."""
import numpy as np


def compare(results, want, output):
    """(largest difference from its own direct answer, how many rows were closer to
    another text's answer than to their own); failed calls are skipped."""

    def rows(res):
        out = next(o for o in res.outputs if o.name == output)
        return np.asarray(out.as_numpy(), dtype=np.float64).reshape(1, -1)

    max_diff, wrong = 0.0, 0
    for i, r in enumerate(results):
        if isinstance(r, Exception):
            continue
        diffs = [float(np.abs(rows(r) - rows(w)).max()) for w in want]
        max_diff = max(max_diff, diffs[i])
        if diffs[i] > min(diffs):  # another text's row is closer than its own
            wrong += 1
    return max_diff, wrong

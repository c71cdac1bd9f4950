"""Vision-tower throughput at one image per pass vs a batch per pass: what dynamic batching can buy."""

from __future__ import annotations

import time


def tower_rates(backend, images, batch: int, rounds: int, best_of: int = 1) -> tuple[float, float]:
    """Images/s of `backend.encode` at 1 and at `batch` images per pass, over `rounds` x `batch`
    images each (preprocessed beforehand, not timed); both shapes warmed up first, then `best_of`
    interleaved runs, best kept (other processes on the same cores add noise). Device work is
    synchronised around each run."""
    images = list(images)[:batch]
    chunks = {n: [backend.preprocess(images[i : i + n]) for i in range(0, batch, n)] for n in (1, batch)}

    def rate(per_pass: int) -> float:
        backend.synchronize()
        start = time.perf_counter()
        for _ in range(rounds):
            for pixels in chunks[per_pass]:
                backend.encode(pixels)
        backend.synchronize()
        return rounds * batch / (time.perf_counter() - start)

    rate(1), rate(batch)  # warm-up at both shapes
    best = {1: 0.0, batch: 0.0}
    for _ in range(best_of):
        for per_pass in best:
            best[per_pass] = max(best[per_pass], rate(per_pass))
    return best[1], best[batch]

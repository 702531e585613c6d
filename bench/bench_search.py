"""The search index's cost (issue #29 point 5): build time, peak memory and query latency of the
package's FAISS indexes (``xstars_models.search.faiss_index``: exact ``IndexFlatIP`` and IVF-PQ)
over synthetic 192-d unit vectors, with IVF-PQ's recall@10 against exact search as the build
measures it.

    python bench/bench_search.py [--sizes 1000000,10000000] [--kinds flat,ivfpq] [--queries 200]

Each (rows, kind) runs in its own process, so each peak RSS is that run's alone. The vectors are
made chunk by chunk (250 000 rows, seeded by the chunk) and never all held at once: 1000 landscape
centres (standard normal), places drawn around them (+ 0.6 x normal noise), and 8 acquisitions of
each place (+ 0.2 x normal noise), scaled to unit length; the noise is rows of a fixed bank of
65 536 draws. So each row has 7 near neighbours, then its landscape. Queries are rows of the first
chunk plus 0.05 x normal noise, one at a time (batch of 1, as ``xstars search`` runs them; 30 on
an exact index of 10M rows, where each scans 7.5 GiB), unfiltered and with a filter keeping a
random 10 % of the rows (FAISS's bitmap selector). Build time includes making the vectors (given
separately); for IVF-PQ it also includes the recall measurement.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np

DIM = 192
CHUNK = 250_000
ACQUISITIONS = 8


def chunk(number: int, rows: int, landscapes: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Rows ``number * CHUNK`` .. of the synthetic dataset (see the module's notes); the normal
    noise is drawn from ``noise``'s rows (a bank of 65 536), which makes the vectors ten times
    faster than drawing it afresh."""
    rng = np.random.default_rng(1000 + number)
    count = rows // ACQUISITIONS + 1
    places = landscapes[rng.integers(0, len(landscapes), count)] + 0.6 * noise[rng.integers(0, len(noise), count)]
    vectors = np.repeat(places, ACQUISITIONS, axis=0)[:rows] + 0.2 * noise[rng.integers(0, len(noise), rows)]
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def one(rows: int, kind: str, queries: int) -> dict:
    """Build one index and time queries on it, in this process."""
    from xstars_models.search.faiss_index import build_index, nearest

    landscapes = np.random.default_rng(0).standard_normal((1000, DIM)).astype(np.float32)
    noise = np.random.default_rng(1).standard_normal((65536, DIM)).astype(np.float32)
    making = [0.0]

    def chunks() -> Iterator[np.ndarray]:
        for number, start in enumerate(range(0, rows, CHUNK)):
            started = time.perf_counter()
            block = chunk(number, min(CHUNK, rows - start), landscapes, noise)
            making[0] += time.perf_counter() - started
            yield block

    started = time.perf_counter()
    index, built = build_index(chunks, rows, DIM, kind, nprobe=16, recall_queries=200)
    build_s = time.perf_counter() - started
    rng = np.random.default_rng(7)
    first = chunk(0, min(CHUNK, rows), landscapes, noise)[:queries]
    probes = first + 0.05 * rng.standard_normal(first.shape).astype(np.float32)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    allowed = rng.random(rows) < 0.1
    latency = {}
    for name, mask in (("all", None), ("10% filter", allowed)):
        times = []
        for q in probes:
            started = time.perf_counter()
            nearest(index, q[None], 10, mask, 16)
            times.append(time.perf_counter() - started)
        latency[name] = {"p50_ms": 1000 * float(np.percentile(times, 50)), "p99_ms": 1000 * float(np.percentile(times, 99))}
    return {
        "rows": rows, "kind": kind, "build_s": build_s, "making_vectors_s": making[0], "params": built.params,
        "recall_at_10": built.recall_at_10, "recall_queries": built.recall_queries, "queries": len(probes),
        "latency": latency, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--kinds", default="flat,ivfpq")
    parser.add_argument("--queries", type=int, default=200, help="single queries timed per index")
    parser.add_argument("--flat-queries-10m", type=int, default=30,
                        help="queries timed on an exact index of 10M rows or more (each scans every vector)")
    parser.add_argument("--one", nargs=2, metavar=("ROWS", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.queries)))
        return
    for rows in (int(s) for s in args.sizes.split(",")):
        for kind in args.kinds.split(","):
            queries = args.flat_queries_10m if kind == "flat" and rows >= 10_000_000 else args.queries
            done = subprocess.run([sys.executable, __file__, "--one", str(rows), kind, "--queries", str(queries)],
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"{rows} {kind}: failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            lat = result["latency"]
            recall = "-" if result["recall_at_10"] is None else f"{result['recall_at_10']:.3f}"
            print(f"| {rows:,} | {kind} {result['params'] or ''} | {result['build_s']:.1f} "
                  f"({result['making_vectors_s']:.1f} making vectors) | {result['peak_rss_mib']:.0f} | "
                  f"{lat['all']['p50_ms']:.2f} / {lat['all']['p99_ms']:.2f} | "
                  f"{lat['10% filter']['p50_ms']:.2f} / {lat['10% filter']['p99_ms']:.2f} | {recall} | "
                  f"{result['queries']} |", flush=True)


if __name__ == "__main__":
    main()

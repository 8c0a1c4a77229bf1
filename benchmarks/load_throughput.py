"""Images per second into the decoded, resized array cache: a cold load and a warm one.

    python benchmarks/load_throughput.py --data-dir ../shared/datasets/ham10000

Cold: list HAM10000, decode and resize every image with the parallel decoder,
write the cache. Warm: the same call again, which reads the cached array. Both
run in one process, side by side, into a fresh cache folder; the figures and
their ratio go to ``--out`` as JSON, with the peak memory of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE_SIZE = 224  # the reference studies' usual input size


def timed_load(paths: list[str], size: int) -> tuple[float, "np.ndarray"]:
    from trainables.data import decode_images

    started = time.perf_counter()
    arrays = decode_images(paths, size)
    return time.perf_counter() - started, arrays


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--data-dir", required=True, help="HAM10000 in its Kaggle layout")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    parser.add_argument("--out", default="benchmarks/results/load_throughput.json")
    args = parser.parse_args(argv)

    from trainables.datasets import load_table

    with tempfile.TemporaryDirectory() as cache:
        os.environ["MEDSEARCH_CACHE"] = cache  # a fresh cache, so the first load is truly cold
        started = time.perf_counter()
        paths = load_table("ham10000", args.data_dir)["path"].tolist()
        list_s = time.perf_counter() - started
        cold_s, cold = timed_load(paths, args.image_size)
        warm_s, warm = timed_load(paths, args.image_size)
        assert (cold == warm).all(), "the cached array differs from the decoded one"
        cache_mb = sum(f.stat().st_size for f in Path(cache).rglob("*.npy")) / 1e6
    n = len(paths)
    figures = {
        "images": n, "image_size": args.image_size, "cpus": os.cpu_count(),
        "list_seconds": round(list_s, 2),
        "cold_seconds": round(cold_s, 2), "cold_images_per_second": round(n / cold_s, 1),
        "warm_seconds": round(warm_s, 2), "warm_images_per_second": round(n / warm_s, 1),
        "warm_over_cold_speedup": round(cold_s / warm_s, 1),
        "array_mb": round(cold.nbytes / 1e6, 1), "cache_mb": round(cache_mb, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Chamfer distance, forward + backward, at 16k x 16k points: genlab's chunked kernel against the
naive dense ``torch.cdist`` formulation (and pytorch3d when it imports, as an extra line).

    python bench/chamfer.py [--points 16384] [--batches 1 4] [--repeats 3] [--big 65536]

Time: median wall time of ``loss.backward()`` including the forward, after one warm-up call.

Memory: every variant runs in its own fresh process (``multiprocessing`` spawn) and reports
the growth of that process's peak resident set size (``resource.getrusage().ru_maxrss``)
from just before the call to just after it. ``tracemalloc`` cannot see torch's allocations and
torch has no CPU allocator statistics, whereas RSS counts every byte the call touched; the
before/after difference of a fresh process is the call's true peak (plus allocator slack).
The naive baseline materialises ``B x N x M`` float32 distances several times (cdist output,
its square, their gradients): about ``4 * 4 * B * N * M`` bytes, 4 GiB at 16k x 16k. It is
skipped (printed with that analytic estimate) when the estimate exceeds ``--naive-max-gib``.
``--big`` runs genlab alone at that size (64k x 64k: the naive matrix alone would be 16 GiB)
to show that its memory grows with ``N + M``, not ``N * M``.

Prints one line per run and, last, ``ratio: <genlab time / naive time>`` at batch 1
(lower is better).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time


def _run(variant: str, batch: int, points: int, repeats: int, queue) -> None:
    import torch

    torch.manual_seed(0)
    x = torch.rand(batch, points, 3, requires_grad=True)
    y = torch.rand(batch, points, 3, requires_grad=True)
    if variant == "genlab":
        from genlab.geometry.mesh_losses import chamfer_distance

        def step():
            return chamfer_distance(x, y, backend="genlab")
    elif variant == "pytorch3d":
        from pytorch3d.loss import chamfer_distance as p3d_chamfer

        def step():
            return p3d_chamfer(x, y)[0]
    else:

        def step():
            d = torch.cdist(x, y) ** 2
            return (d.min(dim=2).values.mean(dim=1) + d.min(dim=1).values.mean(dim=1)).mean()

    times = []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(repeats + 1):
        x.grad = y.grad = None
        start = time.perf_counter()
        loss = step()
        loss.backward()
        times.append(time.perf_counter() - start)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    queue.put((statistics.median(times[1:]), peak_kib / 2**20, float(loss.detach())))


def measure(variant: str, batch: int, points: int, repeats: int) -> tuple[float, float, float]:
    """(median seconds, peak RSS growth GiB, loss) of one variant in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(variant, batch, points, repeats, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _pytorch3d_importable() -> bool:
    try:
        import pytorch3d.loss  # noqa: F401
    except Exception:
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=16384)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--naive-max-gib", type=float, default=6.0)
    p.add_argument("--big", type=int, default=0, help="also run genlab alone at this size")
    args = p.parse_args()
    import torch

    n = args.points
    print(f"{n} x {n} points, forward + backward, {torch.get_num_threads()} threads")
    headline = None
    variants = ["genlab", "naive"] + (["pytorch3d"] if _pytorch3d_importable() else [])
    for batch in args.batches:
        results = {}
        for variant in variants:
            need_gib = 16 * batch * n * n / 2**30
            if variant == "naive" and need_gib > args.naive_max_gib:
                print(
                    f"B={batch} naive cdist : skipped, needs about {need_gib:.0f} GiB "
                    f"(> --naive-max-gib {args.naive_max_gib:g})"
                )
                continue
            seconds, gib, loss = measure(variant, batch, n, args.repeats)
            results[variant] = seconds
            label = {"genlab": "genlab chunked", "naive": "naive cdist", "pytorch3d": "pytorch3d"}
            print(
                f"B={batch} {label[variant]:<14}: {seconds:7.3f} s   peak RSS +{gib:6.3f} GiB   "
                f"loss {loss:.6f}"
            )
        if batch == 1 and "naive" in results:
            headline = results["genlab"] / results["naive"]
        if "pytorch3d" in results:
            print(
                f"B={batch} genlab / pytorch3d time: {results['genlab'] / results['pytorch3d']:.3f}"
            )
    if args.big:
        seconds, gib, loss = measure("genlab", 1, args.big, 1)
        naive_gib = 4 * args.big**2 / 2**30
        print(
            f"B=1 genlab chunked at {args.big} x {args.big}: {seconds:7.3f} s   peak RSS "
            f"+{gib:6.3f} GiB (one naive distance matrix alone: {naive_gib:.0f} GiB)"
        )
    if headline is not None:
        print(f"ratio: {headline:.3f}")


if __name__ == "__main__":
    main()

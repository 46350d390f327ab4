"""Benchmark the chunked weighted k-NN (``fastkd.eval.knn_classify``) against the straightforward
version that materialises the whole ``[M, N]`` similarity matrix before ``topk``, on random
features of ViT-S/B widths. Reports time, peak extra memory and their ratios, and checks both give
the same predictions. The chunked version bounds the similarity matrix at ``chunk_size x N``
(ImageNet: 1024 x 1.28M fp32 = 5.2 GB per chunk instead of 50k x 1.28M = 256 GB at once).

    python -m fastkd.benchmarks.bench_knn [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import peak_memory_bytes, time_fn
from fastkd.eval.knn import MAX_SIMILARITIES, knn_classify
from fastkd.reporting import markdown_table, write_results


def materialised_knn(train, train_labels, test, *, num_classes, k=20, temperature=0.07):
    """What one writes without chunking: all similarities at once, then top-k voting."""
    similarity, index = (F.normalize(test, dim=1) @ F.normalize(train, dim=1).T).topk(k, dim=1)
    votes = torch.zeros(test.shape[0], num_classes, device=test.device)
    votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
    return votes.argmax(1)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_bench_args(bench_parser(__doc__, "one small shape, fewer repeats"), argv)
    shapes = [(20000, 2000, 384)] if args.quick else [(50000, 5000, 384), (50000, 5000, 768), (100000, 5000, 384)]
    repeats = 2 if args.quick else 3
    num_classes = 1000
    generator = torch.Generator().manual_seed(0)
    records = []
    for n_train, n_test, dim in shapes:
        train = torch.randn(n_train, dim, generator=generator).to(args.device)
        labels = torch.randint(0, num_classes, (n_train,), generator=generator).to(args.device)
        test = torch.randn(n_test, dim, generator=generator).to(args.device)

        def chunked():
            return knn_classify(train, labels, test, num_classes=num_classes).predictions

        def materialised():
            return materialised_knn(train, labels, test, num_classes=num_classes)

        if not torch.equal(chunked(), materialised()):
            raise RuntimeError(f"chunked and materialised k-NN disagree at {(n_train, n_test, dim)}")
        shape = {"train": n_train, "test": n_test, "dim": dim, "chunk": max(1, MAX_SIMILARITIES // n_train)}
        rows = {}
        for name, fn in (("materialised", materialised), ("chunked", chunked)):
            timing = time_fn(fn, repeats=repeats, warmup=1, device=args.device)
            rows[name] = {**shape, "variant": name, "device": args.device, "dtype": "fp32",
                          **{k: timing[k] for k in ("median_ms", "p10_ms", "p90_ms")},
                          "peak_MiB": peak_memory_bytes(fn, device=args.device) / 2**20}
        base = rows["materialised"]
        for row in rows.values():
            row["speedup"] = base["median_ms"] / row["median_ms"]
            row["memory_ratio"] = row["peak_MiB"] / max(base["peak_MiB"], 1e-9)
        records += rows.values()
    columns = ["train", "test", "dim", "chunk", "variant", "median_ms", "p10_ms", "p90_ms", "peak_MiB", "speedup",
               "memory_ratio"]
    markdown = "## Weighted k-NN (k=20, T=0.07): chunked vs materialised similarity matrix\n\n" + markdown_table(
        records, columns)
    write_results("bench_knn", records, markdown, out_dir=args.out)
    print(markdown)
    return records


if __name__ == "__main__":
    main()

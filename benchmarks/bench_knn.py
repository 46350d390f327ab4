"""The chunked weighted k-NN (``fastkd.eval.knn_classify``, similarities bounded at ``chunk x N``)
against materialising the whole ``[M, N]`` similarity matrix before ``topk``, on random ViT-S/B-wide
features: time, peak extra memory, their ratios; both must predict the same.

    fastkd bench knn [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastkd.benchmarks.arguments import bench_parser, parse_bench_args
from fastkd.benchmarks.common import compare_variants, report_results
from fastkd.eval.knn import MAX_SIMILARITIES, knn_classify


def materialised_knn(train, train_labels, test, *, num_classes, k=20, temperature=0.07):
    similarity, index = (F.normalize(test, dim=1) @ F.normalize(train, dim=1).T).topk(k, dim=1)
    votes = torch.zeros(test.shape[0], num_classes, device=test.device)
    votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
    return votes.argmax(1)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_bench_args(bench_parser(__doc__, "one small shape, fewer repeats"), argv)
    shapes = [(20000, 2000, 384)] if args.quick else [(50000, 5000, 384), (50000, 5000, 768), (100000, 5000, 384)]
    num_classes, generator, records = 1000, torch.Generator().manual_seed(0), []
    for n_train, n_test, dim in shapes:
        train = torch.randn(n_train, dim, generator=generator).to(args.device)
        labels = torch.randint(0, num_classes, (n_train,), generator=generator).to(args.device)
        test = torch.randn(n_test, dim, generator=generator).to(args.device)
        variants = {"materialised": lambda: materialised_knn(train, labels, test, num_classes=num_classes),
                    "chunked": lambda: knn_classify(train, labels, test, num_classes=num_classes).predictions}
        if not torch.equal(variants["chunked"](), variants["materialised"]()):
            raise RuntimeError(f"chunked and materialised k-NN disagree at {(n_train, n_test, dim)}")
        shape = {"train": n_train, "test": n_test, "dim": dim, "chunk": max(1, MAX_SIMILARITIES // n_train)}
        records += compare_variants(shape, variants, device=args.device, dtype=torch.float32, rounds=1,
                                    repeats=2 if args.quick else 3, baseline="materialised")
    report_results("bench_knn", records, ["train", "test", "dim", "chunk", "variant", "median_ms", "p10_ms", "p90_ms",
                                          "peak_MiB", "speedup", "memory_ratio"],
                   "Weighted k-NN (k=20, T=0.07): chunked vs materialised similarity matrix", device=args.device,
                   out_dir=args.out)
    return records


if __name__ == "__main__":
    main()

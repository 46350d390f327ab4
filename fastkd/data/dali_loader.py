"""Iterator over a DALI view pipeline: feeds the rank's shard, yields :class:`Batch` on the
model's device, and names the undecodable file(s) when decoding fails mid-epoch."""

from __future__ import annotations

import numpy as np
import torch

from .batch import Batch
from .dali_pipeline import build_dali_pipeline
from .datasets import BadImageError, ImageList
from .recipes import Recipe
from .scan import check_image
from .sharding import EpochShard


class _ShardSource:
    """External source: per batch of the epoch's shard, the encoded bytes of its files."""

    def __init__(self, images: ImageList, shard: EpochShard):
        self.images, self.shard = images, shard
        self.batches: list[list[int]] = []

    def __iter__(self):
        self.batches = self.shard.batches()
        for batch in self.batches:
            yield [np.fromfile(self.images.files[i], dtype=np.uint8) for i in batch]


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    """A dense DALI batch copied (DALI reuses its buffers) to ``device`` if on GPU, else to the CPU."""
    from nvidia.dali.plugin.pytorch import feed_ndarray
    from nvidia.dali.tensors import TensorListGPU

    dense = tensor_list.as_tensor()
    on_gpu = isinstance(tensor_list, TensorListGPU)
    out = torch.empty(dense.shape(), dtype=torch.float32, device=device if on_gpu else "cpu")
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(out.device) if on_gpu else None)
    return out


def _dali_reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    return lines[0] if lines else repr(error)


class DaliViewLoader:
    """Iterable of :class:`Batch` from the DALI pipeline (see ``build_loader``); ``device_id=None``: the
    CPU-only pipeline. Augmentations follow the pipeline seed ``(seed, rank)`` through the epochs."""

    def __init__(self, images: ImageList, recipe: Recipe, shard: EpochShard, *, device: torch.device,
                 device_id: int | None, num_threads: int):
        self.images, self.device, self.shard = images, device, shard
        self._prefetch = 2
        self._source = _ShardSource(images, shard)
        self._build = dict(recipe=recipe, batch_size=shard.batch_size, num_threads=num_threads, device_id=device_id,
                           seed=shard.options["seed"] * 1_000_003 + shard.options["rank"], prefetch=self._prefetch)
        self._pipe = None

    def set_epoch(self, epoch: int) -> None:
        self.shard.epoch = epoch

    def __len__(self) -> int:
        return len(self.shard)

    def close(self) -> None:
        """Releases the pipeline (its threads and buffers); the next iteration builds a new one."""
        self._pipe = None

    def __iter__(self):
        if self._pipe is None:
            self._pipe = build_dali_pipeline(source=self._source, **self._build)
            self._pipe.build()
        else:
            self._pipe.reset()
        pipe, position, self._pipe = self._pipe, 0, None  # abandoned or failed mid-epoch: a fresh one next time
        while True:
            try:
                outputs = pipe.run()
            except StopIteration:
                self._pipe = pipe  # finished: reset for the next epoch
                return
            except RuntimeError as error:
                raise self._decode_error(position, error) from error
            batch = self._source.batches[position]
            position += 1
            views = [_to_torch(out, self.device) for out in outputs]
            labels = torch.tensor([self.images.labels[i] for i in batch], dtype=torch.int64)
            yield Batch(views, labels, torch.tensor(batch, dtype=torch.int64)).to(self.device)

    def _decode_error(self, position: int, error: RuntimeError) -> RuntimeError:
        """Name the undecodable files of the failed batch (or of the batches DALI ran ahead on)."""
        window = self._source.batches[position : position + 1 + self._prefetch]
        if not window:
            return RuntimeError(f"DALI pipeline failed: {_dali_reason(error)}")
        bad = [self.images.files[i] for batch in window for i in batch if check_image(self.images.files[i])]
        if bad:
            return BadImageError(f"undecodable image file(s) {bad}; run `fastkd data scan` and pass its exclusion "
                                 f"list as exclude= (DALI: {_dali_reason(error)})")
        files = [self.images.files[i] for i in window[0]]
        return RuntimeError(f"DALI pipeline failed on the batch of files {files}: {_dali_reason(error)}")

"""The overlapped featurization pipeline behind ``extract_features(fast=True)``.

Four stages run at once, joined by bounded queues (so host memory stays flat whatever the slide's size):

1. read (``workers`` threads): the JPEG streams of the TIFF tiles under each batch of grid tiles, each
   once, by ``pread`` (see :mod:`wsi_llava.slide.jpeg_tiles`), or whole tiles through the reader for
   slides that are not tiled JPEG TIFFs;
2. decode (one thread, its own CUDA stream): nvJPEG batch decode, then the grid tiles gathered out of
   the decoded TIFF tiles and resized (antialiased) on the GPU to ``(B, T, T, 3)`` uint8; reader tiles
   are uploaded from pinned memory instead;
3. encode (the calling thread): preprocess + compiled bf16 encoder; features copied to pinned host
   memory without blocking;
4. write (one thread): waits for the copy, checks the features are finite, fills the cache writer.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wsi_llava.errors import ModelError
from wsi_llava.features.fast import FastTileEncoder
from wsi_llava.progress import CancelToken
from wsi_llava.slide.jpeg_tiles import (
    JpegBatch,
    JpegTilePlan,
    assemble,
    check_plan,
    decode_batch,
    jpeg_plan,
    log_plan,
    plan_batch,
    read_streams,
)

logger = logging.getLogger(__name__)

_DONE = object()


@dataclass
class _Loaded:
    idx: np.ndarray
    batch: JpegBatch | None  # the TIFF tiles under the grid tiles, when they are decoded here
    streams: list[bytes]  # their JPEG streams, in ``batch.tiles`` order
    tiles: np.ndarray | None  # (B, T, T, 3) uint8 read through the reader otherwise


@dataclass
class FastStats:
    """What the fast pipeline did, for logs and benchmarks."""

    jpeg_direct: bool = False
    direct_tiles: int = 0  # grid tiles assembled from decoded JPEG tile streams
    reader_tiles: int = 0  # grid tiles read through the reader
    compiled: bool = False
    reason: str | None = None  # why tiles were not decoded from their JPEG streams


def prepare_jpeg_plan(reader: Any, grid: Any, device: torch.device) -> tuple[JpegTilePlan | None, str | None]:
    """The JPEG tile plan if the slide allows it and a sample assembles like the reader; else a reason."""
    try:
        plan, reason = jpeg_plan(reader, grid)
    except Exception as e:  # noqa: BLE001 - odd TIFF structures: use the reader
        plan, reason = None, f"planning failed: {type(e).__name__}: {e}"
    log_plan(reader, plan, reason)
    if plan is None:
        return None, reason
    reason = check_plan(reader, grid, plan, device)
    if reason is not None:
        logger.warning("%s: direct JPEG decoding disabled: %s", reader.path, reason)
        return None, reason
    return plan, None


def _load(reader: Any, grid: Any, plan: JpegTilePlan | None, fd: int | None, idx: np.ndarray) -> _Loaded:
    from wsi_llava.slide.tiling import read_tiles

    if plan is None or fd is None:
        return _Loaded(idx, None, [], read_tiles(reader, grid, idx))
    batch = plan_batch(plan, idx)
    return _Loaded(idx, batch, read_streams(plan, fd, batch.tiles), None)


def _read_ahead(
    reader: Any,
    grid: Any,
    plan: JpegTilePlan | None,
    batches: list[np.ndarray],
    workers: int,
    stop: threading.Event,
) -> Iterator[_Loaded]:
    """Batches loaded by a thread pool, in order, at most ``workers + 1`` ahead."""
    fd = os.open(plan.path, os.O_RDONLY) if plan is not None else None
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="wsi-fast-read")
    pending: deque[Future] = deque()
    nxt = 0
    try:
        while nxt < len(batches) or pending:
            while nxt < len(batches) and len(pending) < workers + 1 and not stop.is_set():
                pending.append(pool.submit(_load, reader, grid, plan, fd, batches[nxt]))
                nxt += 1
            if stop.is_set():
                return
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        if fd is not None:
            os.close(fd)


class _Decoder:
    """Turns loaded batches into ``(B, T, T, 3)`` uint8 on ``device``: JPEG streams decoded and
    assembled there (the TIFF tiles of the previous batch kept for reuse), or reader tiles uploaded."""

    def __init__(self, plan: JpegTilePlan | None, device: torch.device) -> None:
        self.plan, self.device = plan, device
        self._previous: tuple[np.ndarray, torch.Tensor] | None = None

    def __call__(self, loaded: _Loaded) -> torch.Tensor:
        if loaded.batch is None:
            assert loaded.tiles is not None
            host = torch.from_numpy(loaded.tiles)
            cuda = self.device.type == "cuda"
            if cuda:
                host = host.pin_memory()
            return host.to(self.device, non_blocking=cuda)
        assert self.plan is not None
        decoded = decode_batch(loaded.batch, loaded.streams, self.device, self._previous)
        self._previous = (loaded.batch.tiles, decoded)
        return assemble(self.plan, loaded.batch, decoded)


class _Stage(threading.Thread):
    """A thread that feeds ``out`` from ``produce()``; an exception is passed on through the queue."""

    def __init__(
        self, name: str, produce: Callable[[], Iterator[Any]], out: queue.Queue, stop: threading.Event
    ):
        super().__init__(name=name, daemon=True)
        self._produce, self._out, self._halt = produce, out, stop

    def _put(self, item: Any) -> bool:
        return _put(self._out, item, self._halt)

    def run(self) -> None:
        try:
            for item in self._produce():
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; True if it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    while True:
        try:
            item = q.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                return _DONE
            continue
        if isinstance(item, BaseException):
            raise item
        return item


def run_fast_pipeline(
    reader: Any,
    grid: Any,
    fenc: FastTileEncoder,
    write: Callable[[np.ndarray, np.ndarray], None],
    *,
    batch_size: int = 256,
    workers: int = 2,
    cancel: CancelToken | None = None,
    on_batch: Callable[[int], None] | None = None,
    jpeg: bool = True,
) -> FastStats:
    """Encode every tile of ``grid``; ``write(indices, float16 features)`` is called from a writer thread.

    Raises what any stage raised (``ModelError`` for non-finite features, ``Cancelled`` on ``cancel``).
    """
    device = fenc.device
    cuda = device.type == "cuda"
    stats = FastStats(compiled=fenc.compiled)
    plan, stats.reason = prepare_jpeg_plan(reader, grid, device) if jpeg else (None, "disabled")
    stats.jpeg_direct = plan is not None
    idx = np.arange(len(grid), dtype=np.int64)
    batches = [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
    stats.direct_tiles = len(idx) if plan is not None else 0
    stats.reader_tiles = len(idx) - stats.direct_tiles
    stop = threading.Event()
    loaded_q: queue.Queue = queue.Queue(maxsize=2)
    dev_q: queue.Queue = queue.Queue(maxsize=2)
    out_q: queue.Queue = queue.Queue(maxsize=3)
    dstream = torch.cuda.Stream(device) if cuda else None

    def read_stage() -> Iterator[_Loaded]:
        yield from _read_ahead(reader, grid, plan, batches, workers, stop)

    def decode_stage() -> Iterator[tuple[np.ndarray, torch.Tensor, Any]]:
        if cuda:
            torch.cuda.set_device(device)
        to_device = _Decoder(plan, device)
        while True:
            loaded = _get(loaded_q, stop)
            if loaded is _DONE:
                return
            if dstream is not None:
                with torch.cuda.stream(dstream):
                    x = to_device(loaded)
                    ev = torch.cuda.Event()
                    ev.record(dstream)
            else:
                x, ev = to_device(loaded), None
            yield loaded.idx, x, ev

    failure: list[BaseException] = []

    def write_stage() -> None:
        try:
            while True:
                item = _get(out_q, stop)
                if item is _DONE:
                    return
                bidx, host, ev = item
                if ev is not None:
                    ev.synchronize()
                feats = host.numpy()
                if not np.isfinite(feats).all():
                    raise ModelError(
                        f"{reader.path}: tile encoder {fenc.encoder.encoder_id} produced non-finite features"
                    )
                write(bidx, feats)
        except BaseException as e:  # noqa: BLE001
            failure.append(e)
            stop.set()

    reader_t = _Stage("wsi-fast-read", read_stage, loaded_q, stop)
    decoder_t = _Stage("wsi-fast-decode", decode_stage, dev_q, stop)
    writer_t = threading.Thread(target=write_stage, name="wsi-fast-write", daemon=True)
    for t in (reader_t, decoder_t, writer_t):
        t.start()
    # pinned host buffers for the feature copies: a ring longer than the writer's queue + the one it holds
    ring: list[torch.Tensor] = []
    k = 0
    try:
        with torch.inference_mode():
            while True:
                if cancel is not None:
                    cancel.raise_if_cancelled()
                if failure:
                    raise failure[0]
                item = _get(dev_q, stop)
                if item is _DONE:
                    if failure:
                        raise failure[0]
                    break
                bidx, x, ev = item
                if ev is not None:
                    torch.cuda.current_stream(device).wait_event(ev)
                    x.record_stream(torch.cuda.current_stream(device))
                short = batch_size - x.shape[0]
                if short > 0 and fenc.compiled:  # one static shape: no recompilation for the last batch
                    x = torch.cat([x, x.new_zeros((short, *x.shape[1:]))])
                feats = fenc(x)[: len(bidx)].to(torch.float16)
                if cuda:
                    if len(ring) < out_q.maxsize + 3:
                        ring.append(
                            torch.empty((batch_size, feats.shape[1]), dtype=torch.float16, pin_memory=True)
                        )
                    buf = ring[k % len(ring)][: len(bidx)]
                    k += 1
                    buf.copy_(feats, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(torch.cuda.current_stream(device))
                    item_out = (bidx, buf, done)
                else:
                    item_out = (bidx, feats.cpu(), None)
                _put(out_q, item_out, stop)
                if failure:
                    raise failure[0]
                if on_batch is not None:
                    on_batch(len(bidx))
        _put(out_q, _DONE, stop)
        writer_t.join()
        if failure:
            raise failure[0]
    finally:
        stop.set()
        for t in (reader_t, decoder_t, writer_t):
            t.join(timeout=30)
    return stats

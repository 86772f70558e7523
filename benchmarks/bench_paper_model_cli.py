"""The paper model (Prov-GigaPath + LongNet + Vicuna-7B LLaVA) through the CLI, exactly as a user types it.

    python benchmarks/bench_paper_model_cli.py --workdir /tmp/paper_cli --out $OUT/paper_model_cli.json \\
        --summary $OUT/summary.json --budget-s 480                      # one H100 / H200 (run_paper_model_gpu.sh)
    python benchmarks/bench_paper_model_cli.py --tiny --device cpu --tiles 300 --workdir /tmp/paper_cli_tiny
    python benchmarks/bench_paper_model_cli.py --from-json paper_model_cli.json   # file a device run's result

Generates, on the machine it runs on: random weights in exactly the official layouts at full size
(``make_paper_weights.py``: the Prov-GigaPath hub folder with its 1.13 B-parameter ``pytorch_model.bin`` and
``slide_encoder.pth``; the merged ``wsi-llava-v1.5-7b`` folder, sharded safetensors + index; the LoRA form
over it), in a fresh process, while this process writes a pyramidal TIFF with ``--tiles`` tissue tiles
(256 px at 0.5 µm/px, uncompressed tiles as in ``bench_cohort.py``: reading is a ``pread``, so the CPU never
bounds the GPU) and ``--annotations`` QuPath GeoJSON annotations on it. Then runs, each as a fresh process
with a private ``WSI_LLAVA_HOME`` and ``WSI_LLAVA_CACHE``:

    wsi-llava models add NAME --llava MERGED --tile-encoder GIGAPATH
    wsi-llava models add NAME-lora --llava LORA --llava-base MERGED --tile-encoder GIGAPATH
    wsi-llava models check NAME            (and NAME-lora)
    wsi-llava ask SLIDE "..." --model NAME --device cuda --dtype bfloat16 --max-new-tokens N --json
                                           (whole slide, cold: the slide is featurized in this process)
    wsi-llava ask SLIDE "..." --region x,y,w,h ...              (features cached)
    wsi-llava describe --slide SLIDE --geojson in.geojson -o out.geojson --model NAME ...   (20 annotations)
    then, as time allows: the whole-slide ask again with features cached (the baseline that shows what
    featurization costs) and the region ask with the LoRA form.

Per process: wall time; peak GPU memory = max(NVML used memory of the card minus its idle level before
the process, sampled every 20 ms (``nvidia-smi -lms 100`` where pynvml is missing), and
``torch.cuda.max_memory_reserved``); ``torch.cuda.max_memory_allocated`` beside it; host peak RSS (the
process's own ``ru_maxrss``, and ``wait4``'s, which also covers the processes it started). The torch and
own-RSS figures come from a ``sitecustomize`` hook put first on the child's ``PYTHONPATH`` that only reads
the counters at exit (the image's own ``sitecustomize``, if any, still runs); the command line and code
path are the user's. Random weights never emit ``</s>``, so every
answer runs to its cap: ``--max-new-tokens`` bounds it as a user would.

The JSON is rewritten after every stage, so a run cut short keeps what it measured. ``--budget-s`` skips
the stages that would not fit. Headline figures go into ``--summary`` (one flat JSON object shared by every
benchmark; other keys are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _tissue_tiles import BACKGROUND, TILE, downsampled, tile_pool  # noqa: E402

log = logging.getLogger("bench_paper_model_cli")

RESULTS = HERE / "results"
SUMMARY = RESULTS / "summary.json"
MPP = 0.5
MARGIN = 2  #: background tiles around the tissue block
LEVEL_DOWNSAMPLES = (4, 16, 64)
GIB = 1024**3
MODEL = "wsi-llava-7b"
QUESTION_SLIDE = "What is the diagnosis of this whole slide image? Describe the key findings."
QUESTION_REGION = "Describe the tissue in this region."
TARGET_ASK_GPU_GIB = 20.0
HOOK = '''"""Benchmark hook: at exit, write this process's CUDA allocator peaks and peak RSS to $WSI_BENCH_STATS."""

import atexit
import importlib.util
import json
import os
import resource
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


_STATS = os.environ.pop("WSI_BENCH_STATS", None)  # this process only, not the ones it starts


def _dump() -> None:
    out = {"ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            out["max_allocated"] = torch.cuda.max_memory_allocated()
            out["max_reserved"] = torch.cuda.max_memory_reserved()
            out["device"] = torch.cuda.get_device_name()
    except Exception as e:  # the figures are optional; never fail the user's command
        out["error"] = repr(e)
    with open(_STATS, "w") as f:
        json.dump(out, f)


if _STATS:
    atexit.register(_dump)
for _entry in sys.path:  # chain to the sitecustomize this one shadows
    _path = os.path.join(_entry or ".", "sitecustomize.py")
    if os.path.abspath(_entry or ".") != _HERE and os.path.isfile(_path):
        _spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", _path)
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        break
'''


# --- the slide and its annotations ----------------------------------------------------------------------


def tissue_grid(n: int) -> tuple[int, int]:
    """(columns, rows) of a tissue block of exactly ``n`` tiles, about twice as tall as wide."""
    cols = max(c for c in range(1, int((n / 2) ** 0.5) + 1) if n % c == 0)
    return cols, n // cols


def write_slide(path: Path, n_tiles: int, seed: int = 0) -> dict[str, Any]:
    """A pyramidal TIFF whose tissue block holds exactly ``n_tiles`` 256-px tiles (0.5 µm/px, uncompressed)."""
    import tifffile

    t0 = time.perf_counter()
    cols, rows = tissue_grid(n_tiles)
    rng = np.random.default_rng(seed + 1000)
    layout = np.full((rows + 2 * MARGIN, cols + 2 * MARGIN), -1, np.int64)
    layout[MARGIN:-MARGIN, MARGIN:-MARGIN] = rng.integers(0, 24, (rows, cols))
    pool = tile_pool(seed)
    white = np.full((TILE, TILE, 3), BACKGROUND, np.uint8)
    h, w = layout.shape[0] * TILE, layout.shape[1] * TILE
    res = 1e4 / MPP  # px per cm
    kw: dict[str, Any] = dict(
        tile=(TILE, TILE), photometric="rgb", resolutionunit="CENTIMETER", metadata=None
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        tw.write(
            (pool[i] if i >= 0 else white for i in layout.ravel()),
            shape=(h, w, 3),
            dtype=np.uint8,
            resolution=(res, res),
            subfiletype=0,
            **kw,
        )
        for ds in LEVEL_DOWNSAMPLES:
            tw.write(downsampled(pool, layout, ds), resolution=(res / ds, res / ds), subfiletype=1, **kw)
    os.replace(tmp, path)
    return {
        "path": str(path),
        "level0_px": [w, h],
        "tissue_tiles": int((layout >= 0).sum()),
        "tissue_grid_tiles": [cols, rows],
        "levels": 1 + len(LEVEL_DOWNSAMPLES),
        "format": "pyramidal BigTIFF, 256-px uncompressed tiles, 0.5 µm/px, downsamples 1/4/16/64",
        "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _polygon(x: float, y: float, w: float, h: float) -> list[tuple[float, float]]:
    """An irregular octagon inscribed in the box (x, y, w, h), as a hand-drawn annotation."""
    c = 0.3
    return [
        (x + c * w, y),
        (x + (1 - c) * w, y),
        (x + w, y + c * h),
        (x + w, y + (1 - c) * h),
        (x + (1 - c) * w, y + h),
        (x + c * w, y + h),
        (x, y + (1 - c) * h),
        (x, y + c * h),
    ]


def annotation_boxes(n_tiles: int, n: int) -> list[tuple[int, int, int, int]]:
    """``n`` non-overlapping level-0 boxes (x, y, w, h) spread over the tissue block, one per grid cell."""
    cols, rows = tissue_grid(n_tiles)
    gx = max(1, round((n * cols / rows) ** 0.5))
    gy = -(-n // gx)
    cw, ch = cols * TILE / gx, rows * TILE / gy
    side = max(TILE, min(10 * TILE, 0.6 * min(cw, ch)))
    boxes = []
    for k in range(n):
        i, j = k % gx, k // gx
        x = MARGIN * TILE + i * cw + (cw - side) / 2
        y = MARGIN * TILE + j * ch + (ch - side) / 2
        boxes.append((int(x), int(y), int(side), int(side)))
    return boxes


def write_annotations(path: Path, n_tiles: int, n: int) -> dict[str, Any]:
    """QuPath GeoJSON of ``n`` annotations (rectangles and polygons, classified, named, with ids)."""
    from wsi_llava.slide.geojson import read_geojson, write_geojson
    from wsi_llava.slide.region import Region

    classes = [("Tumor", [200, 0, 0]), ("Stroma", [150, 200, 150]), ("Necrosis", [50, 50, 50])]
    regions = []
    for k, (x, y, w, h) in enumerate(annotation_boxes(n_tiles, n)):
        name, color = classes[k % len(classes)]
        props = {
            "objectType": "annotation",
            "classification": {"name": name, "color": color},
            "isLocked": False,
        }
        rid = str(uuid.UUID(int=k + 1, version=4))
        if k % 2:
            regions.append(
                Region(points=_polygon(x, y, w, h), id=rid, name=f"ROI {k + 1:02d}", properties=props)
            )
        else:
            regions.append(Region.rectangle(x, y, w, h, id=rid, name=f"ROI {k + 1:02d}", properties=props))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_geojson(path, regions)
    back = read_geojson(path)
    return {"path": str(path), "annotations": len(back), "box_px": annotation_boxes(n_tiles, n)[0][2]}


def region_box(n_tiles: int) -> tuple[int, int, int, int]:
    """The region of the region question: the middle 40 % x 25 % of the tissue block, on the tile grid."""
    cols, rows = tissue_grid(n_tiles)
    w, h = max(1, round(cols * 0.4)), max(1, round(rows * 0.25))
    x, y = MARGIN + (cols - w) // 2, MARGIN + (rows - h) // 2
    return x * TILE, y * TILE, w * TILE, h * TILE


# --- measuring a child process --------------------------------------------------------------------------


class GpuSampler:
    """Used memory of GPU ``index`` sampled in a thread (NVML, else ``nvidia-smi -lms``): peak over a window."""

    def __init__(self, index: int = 0) -> None:
        self.method: str | None = None
        self.card: str | None = None
        self.total_gib: float | None = None
        self._read: Callable[[], int | None] | None = None
        self._used: int | None = None
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            self.card = name.decode() if isinstance(name, bytes) else name
            self.total_gib = round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / GIB, 2)
            self._read = lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            self.method = "NVML used memory, every 20 ms"
            threading.Thread(target=self._poll, daemon=True).start()
        except Exception:
            self._start_smi(index)

    def _start_smi(self, index: int) -> None:
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return
        q = [exe, "-i", str(index), "--format=csv,noheader,nounits"]
        try:
            info = subprocess.run(
                [*q, "--query-gpu=name,memory.total"], capture_output=True, text=True, check=True
            )
            name, total = info.stdout.strip().splitlines()[0].rsplit(",", 1)
            self.card, self.total_gib = name.strip(), round(float(total) * 2**20 / GIB, 2)
            self._proc = subprocess.Popen(
                [*q, "--query-gpu=memory.used", "-lms", "100"], stdout=subprocess.PIPE, text=True
            )
        except (OSError, subprocess.SubprocessError, ValueError):
            return
        self.method = "nvidia-smi memory.used, every 100 ms"
        threading.Thread(target=self._follow, daemon=True).start()

    def _note(self, used: int) -> None:
        with self._lock:
            self._used = used
            self._peak = max(self._peak, used)

    def _poll(self) -> None:
        assert self._read is not None
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self._note(self._read())
            time.sleep(0.02)

    def _follow(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                self._note(int(float(line.strip()) * 2**20))

    def begin(self) -> int | None:
        """Start a window once the level has settled (the last process's memory freed); returns that level."""
        if not self.method:
            return None
        last, t0 = None, time.perf_counter()
        while time.perf_counter() - t0 < 5:
            time.sleep(0.25)  # at least one fresh sample each time
            with self._lock:
                now = self._used
            if now is not None and last is not None and abs(now - last) < 16 * 2**20:
                break
            last = now
        with self._lock:
            self._peak = self._used or 0
            return self._used

    def peak(self) -> int | None:
        """The highest level since :meth:`begin`."""
        time.sleep(0.25)
        with self._lock:
            return self._peak if self.method else None

    def close(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()


@dataclass
class Run:
    """One child process's outcome and measurements."""

    command: str
    rc: int | None = None
    timed_out: bool = False
    wall_s: float = 0.0
    peak_gpu_gib: float | None = None
    gpu_used_peak_minus_idle_gib: float | None = None
    gpu_idle_gib: float | None = None
    torch_max_reserved_gib: float | None = None
    torch_max_allocated_gib: float | None = None
    host_peak_rss_gib: float | None = None
    host_peak_rss_with_children_gib: float | None = None
    stdout: str = ""
    stderr_tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, long outputs cut."""
        d = {k: v for k, v in self.__dict__.items() if k not in ("extra", "stdout")}
        if not self.command.startswith("wsi-llava ask"):  # an answer's JSON is parsed instead
            d["stdout_tail"] = self.stdout[-1500:]
        d.update(self.extra)
        return d


def _gib(n: float | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


class Runner:
    """Runs commands as fresh processes in one environment and measures each."""

    def __init__(
        self, workdir: Path, env: dict[str, str], sampler: GpuSampler, log_file: Path | None
    ) -> None:
        self.workdir = workdir
        self.env = env
        self.sampler = sampler
        self.log_file = log_file
        hook = workdir / "hook"
        hook.mkdir(parents=True, exist_ok=True)
        (hook / "sitecustomize.py").write_text(HOOK)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook), env.get("PYTHONPATH")) if p)

    def run(self, name: str, argv: list[str], timeout: float) -> Run:
        """Run ``argv`` (its first item found on PATH, as a shell would), at most ``timeout`` seconds."""
        stats = self.workdir / f"{name}.stats.json"
        stats.unlink(missing_ok=True)
        out_path, err_path = self.workdir / f"{name}.stdout", self.workdir / f"{name}.stderr"
        env = {**self.env, "WSI_BENCH_STATS": str(stats)}
        exe = shutil.which(argv[0], path=env.get("PATH")) or argv[0]
        res = Run(command=shlex.join(argv))
        log.info("$ %s", res.command)
        idle = self.sampler.begin()
        t0 = time.perf_counter()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [exe, *argv[1:]], stdout=out, stderr=err, env=env, cwd=self.workdir, start_new_session=True
            )
            killer = threading.Timer(timeout, self._kill, (proc, res))
            killer.start()
            _, status, usage = os.wait4(proc.pid, 0)
            killer.cancel()
        res.wall_s = round(time.perf_counter() - t0, 2)
        res.rc = proc.returncode = os.waitstatus_to_exitcode(status)
        peak = self.sampler.peak()
        res.host_peak_rss_with_children_gib = round(usage.ru_maxrss * 1024 / GIB, 3)
        res.host_peak_rss_gib = res.host_peak_rss_with_children_gib
        if idle is not None and peak is not None:
            res.gpu_idle_gib = _gib(idle)
            res.gpu_used_peak_minus_idle_gib = _gib(max(0, peak - idle))
        if stats.is_file():
            s = json.loads(stats.read_text())
            res.torch_max_reserved_gib = _gib(s.get("max_reserved"))
            res.torch_max_allocated_gib = _gib(s.get("max_allocated"))
            res.host_peak_rss_gib = _gib(s["ru_maxrss_kb"] * 1024)
        figures = [v for v in (res.gpu_used_peak_minus_idle_gib, res.torch_max_reserved_gib) if v is not None]
        res.peak_gpu_gib = max(figures) if figures else None
        res.stdout = out_path.read_text(errors="replace")
        err_text = err_path.read_text(errors="replace")
        res.stderr_tail = err_text[-3000:]
        if self.log_file is not None:
            with open(self.log_file, "a") as f:
                f.write(f"\n===== {name}: $ {res.command}\n----- rc {res.rc}, {res.wall_s} s; stdout:\n")
                f.write(res.stdout[-20000:])
                f.write("\n----- stderr:\n" + err_text[-20000:] + "\n")
        level = logging.INFO if res.rc == 0 else logging.ERROR
        log.log(level, "%s: rc %s in %.1f s, GPU %s GiB", name, res.rc, res.wall_s, res.peak_gpu_gib)
        if res.rc != 0:
            log.error("%s stderr:\n%s", name, err_text[-2000:])
        return res

    @staticmethod
    def _kill(proc: subprocess.Popen, res: Run) -> None:
        """Out of time: kill the command and what it started (its own process group)."""
        res.timed_out = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


# --- the benchmark --------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(sampler: GpuSampler) -> dict[str, Any]:
    """Versions (from package metadata, without importing torch here) and the card."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": sampler.card,
        "gpu_memory_gib": sampler.total_gib,
        "gpu_memory_method": sampler.method,
    }
    for dist in ("torch", "transformers", "timm", "peft", "safetensors", "tifffile", "zarr"):
        info[dist] = _version(dist)
    return info


def parse_answer(stdout: str) -> dict[str, Any]:
    """The headline of an ``ask --json`` answer: scope, tiles with evidence, timings, answer's start."""
    try:
        a = json.loads(stdout[stdout.index("{") :])
    except ValueError:
        return {"answer_parse_error": stdout[-300:]}
    ev = a.get("evidence") or {}
    return {
        "scope": a.get("scope"),
        "evidence_tiles": len(ev.get("tile_indices") or []),
        "timings": a.get("timings"),
        "answer_start": (a.get("answer") or "")[:160],
        "warnings": a.get("warnings"),
    }


def described(path: Path, before: Path) -> dict[str, Any]:
    """How many annotations of ``before`` came back with changed properties (a description) in ``path``."""
    if not path.is_file():
        return {"described": 0, "output_written": False}
    old = {f.get("id"): f.get("properties") for f in json.loads(before.read_text())["features"]}
    new = json.loads(path.read_text())["features"]
    return {
        "described": sum(f.get("properties") != old.get(f.get("id")) for f in new),
        "features_out": len(new),
        "output_written": True,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The summary.json keys of this run (only figures it measured, each with its ``_card``)."""
    stages = result.get("stages", {})
    card = (result.get("machine") or {}).get("gpu") or "cpu"
    picks = {
        "paper_model_ask_wall_s": ("ask_slide", "wall_s"),
        "paper_model_ask_peak_gpu_gib": ("ask_slide", "peak_gpu_gib"),
        "paper_model_ask_host_rss_gib": ("ask_slide", "host_peak_rss_gib"),
        "paper_model_ask_warm_wall_s": ("ask_slide_warm", "wall_s"),
        "paper_model_ask_region_wall_s": ("ask_region", "wall_s"),
        "paper_model_describe20_wall_s": ("describe", "wall_s"),
        "paper_model_models_add_wall_s": ("models_add", "wall_s"),
    }
    out: dict[str, Any] = {}
    for key, (stage, fig) in picks.items():
        s = stages.get(stage) or {}
        if s.get("rc") == 0 and isinstance(s.get(fig), int | float):
            out[key] = s[fig]
            out[f"{key}_card"] = card
    return out


def merge_summary(path: Path, keys: dict[str, Any]) -> None:
    """Merge ``keys`` into the flat summary JSON at ``path`` (created if absent; other keys kept)."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(keys)
    write_json(path, dict(sorted(data.items())))


def print_table(result: dict[str, Any]) -> None:
    """The per-stage table."""
    m = result.get("machine", {})
    print(f"\npaper model through the CLI ({result['config']['size']}), {m.get('gpu') or 'no GPU'}")
    print(f"{'stage':<20} {'rc':>3} {'wall s':>8} {'GPU GiB':>8} {'torch res':>9} {'RSS GiB':>8}  note")

    def f(v: Any, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    for name, s in result.get("stages", {}).items():
        note = s.get("note", "")
        if s.get("skipped"):
            print(f"{name:<20} {'':>3} {'':>8} {'':>8} {'':>9} {'':>8}  skipped: {s['skipped']}")
            continue
        print(
            f"{name:<20} {f(s.get('rc'), 'd'):>3} {f(s.get('wall_s'), '.1f'):>8} {f(s.get('peak_gpu_gib')):>8} "
            f"{f(s.get('torch_max_reserved_gib')):>9} {f(s.get('host_peak_rss_gib')):>8}  {note}"
        )
    for k, v in result.get("targets", {}).items():
        print(f"target {k}: {v}")


def _stage_note(name: str, res: Run, ctx: dict[str, Any]) -> None:
    """Parse what a stage printed into its record."""
    if res.rc != 0:
        lines = res.stderr_tail.strip().splitlines()
        res.extra["note"] = ("timed out; " if res.timed_out else "FAILED: ") + (
            lines[-1][:100] if lines else ""
        )
    elif name.startswith("ask"):
        res.extra.update(parse_answer(res.stdout))
        t = res.extra.get("timings") or {}
        res.extra["note"] = (
            f"{res.extra.get('scope')}, evidence on {res.extra.get('evidence_tiles')} tiles, "
            f"features {t.get('features', 0):.1f} s, decode {t.get('decode', 0):.1f} s "
            f"({t.get('new_tokens', 0)} tokens)"
        )
    elif name == "describe":
        res.extra.update(described(Path(ctx["geojson_out"]), Path(ctx["geojson_in"])))
        res.extra["note"] = f"{res.extra.get('described')} of {ctx['annotations']} annotations described"
    elif name.startswith("models"):
        res.extra["note"] = res.stdout.strip().splitlines()[0][:90] if res.stdout.strip() else ""


def main(argv: list[str] | None = None) -> int:
    """Generate weights + slide, run every command as a fresh process, write the JSON and the summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/wsi_llava_paper_cli"))
    ap.add_argument(
        "--out", type=Path, help="result JSON (default results/paper_model_cli.json; tiny: workdir)"
    )
    ap.add_argument(
        "--summary", type=Path, help="summary JSON to merge headline keys into (default results/)"
    )
    ap.add_argument(
        "--from-json", type=Path, help="file an earlier run's JSON: print, copy to --out, summarise"
    )
    ap.add_argument(
        "--weights", type=Path, help="make_paper_weights.py folder to reuse (default workdir/weights)"
    )
    ap.add_argument(
        "--tiny", action="store_true", help="tiny widths, same layouts and commands (CPU smoke test)"
    )
    ap.add_argument("--device", default="cuda", help="--device of every command")
    ap.add_argument("--dtype", default="bfloat16", help="--dtype of every command ('' for the default)")
    ap.add_argument("--tiles", type=int, default=20000, help="tissue tiles of the slide")
    ap.add_argument(
        "--skip-lora", action="store_true", help="leave out the LoRA model's add, check and ask stages"
    )
    ap.add_argument("--annotations", type=int, default=20)
    ap.add_argument("--ask-tokens", type=int, default=256, help="--max-new-tokens of ask")
    ap.add_argument("--describe-tokens", type=int, default=128, help="--max-new-tokens of describe")
    ap.add_argument(
        "--budget-s", type=float, default=None, help="stop starting stages after this many seconds"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    default_out = (args.workdir if args.tiny else RESULTS) / "paper_model_cli.json"
    out = args.out or default_out
    summary = args.summary or (args.workdir / "summary.json" if args.tiny else SUMMARY)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        if args.from_json.resolve() != out.resolve():
            write_json(out, result)
        if result["config"]["size"] == "full" or args.summary:  # tiny figures stay out of results/
            merge_summary(summary, headline(result))
        print_table(result)
        print(f"\nwrote {out}; summary keys merged into {summary}")
        return 0

    t_start = time.perf_counter()
    deadline = None if args.budget_s is None else t_start + args.budget_s
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    weights = args.weights or work / "weights"
    sampler = GpuSampler()
    result: dict[str, Any] = {
        "benchmark": "paper_model_cli",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(sampler),
        "what": "the paper model's parts as random weights in the official layouts, driven through the "
        "wsi-llava CLI as a user types it, one fresh process per command",
        "config": {
            "size": "tiny" if args.tiny else "full",
            "device": args.device,
            "dtype": args.dtype or None,
            "tiles": args.tiles,
            "annotations": args.annotations,
            "ask_max_new_tokens": args.ask_tokens,
            "describe_max_new_tokens": args.describe_tokens,
            "budget_s": args.budget_s,
            "peak_gpu_gib": "max(card's used memory minus its idle level before the process, "
            "torch.cuda.max_memory_reserved); host_peak_rss_gib: the process's own ru_maxrss at exit; "
            "host_peak_rss_with_children_gib: wait4's, which also covers what it started (compile workers)",
            "max_new_tokens_note": "random weights never emit </s>: every answer runs to its cap",
        },
        "stages": {},
        "errors": {},
    }

    def dump() -> None:
        result["total_wall_s"] = round(time.perf_counter() - t_start, 1)
        write_json(out, result)

    def left() -> float:
        return float("inf") if deadline is None else deadline - time.perf_counter()

    # the weights (a fresh process, GPU random numbers) while this process writes the slide
    log_file = out.parent / "commands.log"
    log_file.unlink(missing_ok=True)
    manifest = weights / "weights.json"
    size = "tiny" if args.tiny else "full"
    weights_proc = None
    t_weights = time.perf_counter()
    reuse = manifest.is_file() and json.loads(manifest.read_text()).get("size") == size
    if not reuse:
        cmd = [sys.executable, str(HERE / "make_paper_weights.py"), str(weights)]
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--device", "cuda" if args.device.startswith("cuda") else "cpu"]
        log.info("$ %s", shlex.join(cmd))
        weights_log = open(work / "weights.log", "wb")  # noqa: SIM115 - closed after the wait below
        weights_proc = subprocess.Popen(cmd, stdout=weights_log, stderr=subprocess.STDOUT)
    slide = work / f"slide_{args.tiles}.tif"
    geojson_in, geojson_out = work / "annotations.geojson", work / "described.geojson"
    try:
        result["slide"] = write_slide(slide, args.tiles)
        result["slide"]["annotations"] = write_annotations(geojson_in, args.tiles, args.annotations)
        log.info("slide: %s", result["slide"])
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on only if it can
        result["errors"]["slide"] = repr(e)
        log.exception("slide generation failed")
    if weights_proc is not None:
        try:
            rc = weights_proc.wait(timeout=None if deadline is None else max(1.0, left()))
        except subprocess.TimeoutExpired:
            weights_proc.kill()
            rc = weights_proc.wait()
        weights_log.close()
        with open(log_file, "a") as f:
            f.write("===== weights\n" + (work / "weights.log").read_text(errors="replace")[-20000:] + "\n")
        if rc != 0:
            result["errors"]["weights"] = f"make_paper_weights.py exited {rc} (see commands.log)"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        result["weights"] = {
            "reused": reuse,
            "wall_s": None if reuse else round(time.perf_counter() - t_weights, 1),
            "device": m["device"],
            "parts": {
                k: {kk: v[kk] for kk in v if kk not in ("files", "folder", "tokenizer")}
                | {"files": len(v["files"])}
                for k, v in m["parts"].items()
            },
            "gigabytes": round(sum(v["bytes"] for v in m["parts"].values()) / 1e9, 2),
        }
    dump()
    if result["errors"]:
        print_table(result)
        return 1

    gigapath, merged, lora = (
        weights / "prov-gigapath",
        weights / "wsi-llava-v1.5-7b",
        weights / "wsi-llava-v1.5-7b-lora",
    )
    env = dict(os.environ)
    env.update(
        WSI_LLAVA_HOME=str(work / "home"),
        WSI_LLAVA_CACHE=str(work / "cache"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    shutil.rmtree(work / "home", ignore_errors=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    runner = Runner(work, env, sampler, log_file)
    model_opts = ["--device", args.device] + (["--dtype", args.dtype] if args.dtype else [])
    x, y, w, h = region_box(args.tiles)
    lora_name = f"{MODEL}-lora"

    def ask(question: str, model: str, region: bool = False) -> list[str]:
        """``wsi-llava ask`` of the slide (or of the region box) with the run's model options, as JSON."""
        where = ["--region", f"{x},{y},{w},{h}"] if region else []
        tail = ["--max-new-tokens", str(args.ask_tokens), "--json"]
        return ["wsi-llava", "ask", str(slide), question, *where, "--model", model, *model_opts, *tail]

    stages: list[tuple[str, list[str], float]] = [
        # name, argv, the least time it needs (skipped when less is left)
        (
            "models_add",
            ["wsi-llava", "models", "add", MODEL, "--llava", str(merged), "--tile-encoder", str(gigapath)],
            10,
        ),
        (
            "models_add_lora",
            ["wsi-llava", "models", "add", lora_name, "--llava", str(lora), "--llava-base", str(merged)]
            + ["--tile-encoder", str(gigapath)],
            10,
        ),
        ("models_check", ["wsi-llava", "models", "check", MODEL], 8),
        ("models_check_lora", ["wsi-llava", "models", "check", lora_name], 8),
        ("ask_slide", ask(QUESTION_SLIDE, MODEL), 60),
        ("ask_region", ask(QUESTION_REGION, MODEL, region=True), 30),
        (
            "describe",
            [
                "wsi-llava",
                "describe",
                "--slide",
                str(slide),
                "--geojson",
                str(geojson_in),
                "-o",
                str(geojson_out),
            ]
            + ["--model", MODEL, *model_opts, "--max-new-tokens", str(args.describe_tokens)],
            40,
        ),
        ("ask_slide_warm", ask(QUESTION_SLIDE, MODEL), 30),
        ("ask_region_lora", ask(QUESTION_REGION, lora_name, region=True), 40),
    ]
    if args.skip_lora:
        stages = [st for st in stages if "lora" not in st[0]]
    ctx = {"geojson_in": str(geojson_in), "geojson_out": str(geojson_out), "annotations": args.annotations}
    failed = False
    for name, cmd, least in stages:
        remaining = left() - 5
        if remaining < least:
            result["stages"][name] = {
                "command": shlex.join(cmd),
                "skipped": f"{remaining:.0f} s left of the budget",
            }
            log.warning("skipping %s: %.0f s left", name, remaining)
            dump()
            continue
        res = runner.run(name, cmd, timeout=min(remaining, 600))
        _stage_note(name, res, ctx)
        result["stages"][name] = res.as_dict()
        if res.rc != 0:
            failed = True
            result["errors"][name] = f"rc {res.rc}" + (" (timed out)" if res.timed_out else "")
        dump()
    sampler.close()

    slide_ask = result["stages"].get("ask_slide", {})
    warm = result["stages"].get("ask_slide_warm", {})
    on_gpu = args.device.startswith("cuda") and slide_ask.get("torch_max_reserved_gib") is not None
    if slide_ask.get("rc") == 0 and on_gpu and slide_ask.get("peak_gpu_gib") is not None:
        result["targets"] = {
            f"ask_slide_peak_gpu_under_{TARGET_ASK_GPU_GIB:g}_gib": slide_ask["peak_gpu_gib"]
            < TARGET_ASK_GPU_GIB
        }
    if slide_ask.get("rc") == 0 and warm.get("rc") == 0:
        result["ratios"] = {"ask_slide_cold_over_warm_wall": round(slide_ask["wall_s"] / warm["wall_s"], 2)}
    dump()
    merge_summary(summary, headline(result))
    print_table(result)
    print(f"\nwrote {out}; summary keys merged into {summary}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

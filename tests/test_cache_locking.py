"""Two real processes extracting one slide into one cache: the tiles are encoded once, both get them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
from kits.cache import write_pyramid

EXTRACT_ONE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from wsi_llava.features.cache import FeatureCache
    from wsi_llava.features.extract import extract_features
    from wsi_llava.features.tile import build_tile_encoder
    from wsi_llava.slide import open_slide
    from wsi_llava.slide.tiling import make_tile_grid

    slide, root, counter, go, out = map(Path, sys.argv[1:6])
    enc = build_tile_encoder("demo-vit")

    def count(module, args):
        with open(counter, "a") as f:
            f.write(f"{len(args[0])}\\n")
        time.sleep(0.1)  # slow enough that the two runs overlap

    enc.register_forward_pre_hook(count)
    with open_slide(slide) as reader:
        grid = make_tile_grid(reader, target_mpp=0.5, tile_size=128, min_tissue=0)
        cache = FeatureCache(root)
        print("ready", flush=True)
        while not go.exists():
            time.sleep(0.005)
        feats = extract_features(reader, grid, enc, cache, batch_size=8)
    np.save(out, feats.features)
    print("encoded" if feats.encoded else "reused", flush=True)
    """
)


def test_two_processes_extracting_one_slide_encode_it_once(tmp_path):
    slide = write_pyramid(tmp_path / "ihc.tif")
    root, counter, go = tmp_path / "cache", tmp_path / "encoded.txt", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                EXTRACT_ONE,
                str(slide),
                str(root),
                str(counter),
                str(go),
                str(tmp_path / f"{i}.npy"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        go.touch()  # both start extracting at once
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    assert sorted(out.split()[-1] for out, _ in outs) == ["encoded", "reused"]
    assert sum(int(x) for x in counter.read_text().split()) == 48  # every tile encoded once in total
    a, b = np.load(tmp_path / "0.npy"), np.load(tmp_path / "1.npy")
    assert a.shape == (48, 192) and np.array_equal(a, b)

"""The QuPath bridge tests' parts: a tiny registered model and the Java test double of QuPath's py4j entry point.

The tiny model is real model code (a 2-layer Llama, the demo tile encoder and a small LongNet) so that
answers are generated, quickly, on CPU. The fixtures over them (``tiny_model``, ``fake_qupath``) are in
``conftest.py``.
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import subprocess
import time
from pathlib import Path

from kits import ROOT
from kits.processes import stop
from wsi_llava import hookimpl

TINY_MODEL = "tiny-qupath"
TESTDOUBLE_SRC = ROOT / "qupath_ext" / "testdouble" / "FakeQuPath.java"
#: the name the tiny model's plugin is registered under for the test session
PLUGIN_NAME = "qupath-test-tiny-model"


def load_tiny(device: str = "cpu", dtype: str | None = None):
    """A tiny WSILlava over the demo tile encoder (192-d): real code, random weights, milliseconds a token."""
    import torch

    from kits.llm import make_tiny_llama, make_tiny_tokenizer
    from wsi_llava.model.projector import build_projector
    from wsi_llava.model.spec import LLMSpec, ModelSpec, ProjectorSpec, TileEncoderSpec
    from wsi_llava.model.wsi_llava import WSILlava
    from wsi_llava.slide_encoder.config import SlideEncoderConfig
    from wsi_llava.slide_encoder.slide_encoder import SlideEncoder

    tok = make_tiny_tokenizer()
    llm = make_tiny_llama(tok, seed=0)
    torch.manual_seed(0)
    se_cfg = SlideEncoderConfig.demo(in_dim=192, n_tokens=16)
    spec = ModelSpec(
        name=TINY_MODEL,
        untrained=True,  # random tile encoder, declared: sessions refuse undeclared random parts
        tile_encoder=TileEncoderSpec(name="demo-vit"),
        slide_encoder=se_cfg.model_dump(mode="json"),
        projector=ProjectorSpec(in_dim=se_cfg.out_dim, out_dim=64),
        llm=LLMSpec(source="tiny"),
        template="chat",
    )
    projector = build_projector("mlp2x_gelu", se_cfg.out_dim, 64).eval()
    return WSILlava(llm, tok, projector, spec, slide_encoder=SlideEncoder(se_cfg).eval())


class TinyModelPlugin:
    @staticmethod
    @hookimpl
    def register_models(register):
        register(TINY_MODEL, load_tiny, description="tiny random model for the QuPath bridge tests")


# --- the Java test double of QuPath's py4j entry point ---------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_fake_qupath(build: Path) -> str:
    """Compile the test double into ``build`` with javac against the jar the py4j package ships; its classpath."""
    from py4j.java_gateway import find_jar_path

    jar = find_jar_path()
    subprocess.run(["javac", "-cp", jar, "-d", str(build), str(TESTDOUBLE_SRC)], check=True, timeout=120)
    return f"{jar}{os.pathsep}{build}"


class FakeQuPath:
    """A running test double: ``port``, ``token`` and a Python gateway to set it up and inspect it."""

    def __init__(self, classpath: str, token: str | None = None) -> None:
        self.port = free_port()
        self.token = token
        cmd = ["java", "-cp", classpath, "FakeQuPath", str(self.port)] + ([token] if token else [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.gateway = None
        try:
            self._connect(token)
        except BaseException:
            stop(self.proc)  # never leave the JVM behind when it did not come up
            raise

    def _connect(self, token: str | None) -> None:
        from py4j.java_gateway import GatewayParameters, JavaGateway

        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith("GATEWAY_STARTED") or not line:
                    break
        if not line.startswith("GATEWAY_STARTED"):
            raise RuntimeError(f"the QuPath test double did not start: {line!r}")
        params = (
            GatewayParameters(port=self.port, auth_token=token)
            if token
            else GatewayParameters(port=self.port)
        )
        self.gateway = JavaGateway(gateway_parameters=params, auto_convert=True)
        self.ep = self.gateway.entry_point

    def open_image(self, uri: str, png: Path | None, width: int, height: int, mpp: float) -> None:
        self.ep.testOpenImage(uri, str(png) if png else None, width, height, float(mpp))

    def add_object(self, feature: dict, selected: bool = False) -> str:
        """Add an object from a QuPath-style feature; returns its id."""
        return self.ep.testAddObject(json.dumps(feature), bool(selected))

    def objects(self) -> list[dict]:
        """Every stored object as the feature dict the double serialises (what QuPath would export)."""
        objs = self.ep.getCurrentImageData().getHierarchy().getAnnotationObjects()
        return [json.loads(s) for s in self.ep.toGeoJsonFeatureList(objs)]

    def detections(self) -> list[dict]:
        """Every stored detection as the feature the double serialises, with its parent's id under ``parent``."""
        objs = self.ep.getCurrentImageData().getHierarchy().getDetectionObjects()
        out = []
        for obj, text in zip(objs, self.ep.toGeoJsonFeatureList(objs), strict=True):
            parent = obj.getParent()
            out.append(
                {**json.loads(text), "parent": None if parent is None else str(parent.getID().toString())}
            )
        return out

    def add_child(self, parent_id: str, feature: dict) -> str:
        """Add an object from a QuPath-style feature below the stored object ``parent_id``; returns its id."""
        hierarchy = self.ep.getCurrentImageData().getHierarchy()
        parent = next(o for o in hierarchy.getAllObjects(False) if str(o.getID().toString()) == parent_id)
        child = self.ep.toPathObjects(json.dumps(feature))[0]
        hierarchy.addObjectBelowParent(parent, child, False)
        return str(child.getID().toString())

    def close(self) -> None:
        """Disconnect and stop the JVM; the JVM is stopped even when disconnecting fails."""
        try:
            if self.gateway is not None:
                self.gateway.close()
                self.gateway._gateway_client.is_connected = False  # no reconnects to a stopped JVM from GC
        finally:
            stop(self.proc)


def png_b64_size(text: str) -> tuple[int, int]:
    from io import BytesIO

    from PIL import Image

    return Image.open(BytesIO(base64.b64decode(text))).size

"""Talk to a running QuPath through its py4j gateway (qubalab): image, annotations, write-back, refresh.

Uses only calls that QuPath's py4j entry point (``QuPathEntryPoint extends QPEx``) offers:
``getCurrentImageData``, ``getHierarchy().getAnnotationObjects()``, the selection model,
``toGeoJsonFeatureList``, ``toPathObjects``, ``getImageBase64``, ``fireHierarchyUpdate``, the hierarchy's
``addObjects`` / ``addObjectBelowParent`` / ``removeObjects`` and the objects' own ``setDescription`` /
``setName`` / ``getMeasurements().put`` / ``getChildObjects``. Coordinates are level-0 pixels, as QuPath's.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import numpy as np
from pydantic import BaseModel, ConfigDict

from wsi_llava.annotate import DESCRIPTION_KEY, AnnotationUpdate, apply_to_properties
from wsi_llava.errors import AnnotationError, WsiLlavaError
from wsi_llava.slide.region import Region

logger = logging.getLogger(__name__)

DEFAULT_PORT = 25333
CONNECT_TIMEOUT = 30.0  # seconds for the handshake; QuPath answers it at once when its gateway runs
#: seconds one call may wait for QuPath's reply once connected (the pixels of a large region are the slowest)
CALL_TIMEOUT = 60.0
T = TypeVar("T")


class QuPathError(WsiLlavaError):
    """QuPath is not reachable, has no image open, or refused a call."""


class ImageInfo(BaseModel):
    """The image open in QuPath: where its file is (if this machine can reach it) and its geometry."""

    model_config = ConfigDict(extra="forbid")

    server_path: str
    uris: list[str]
    local_path: Path | None
    width: int
    height: int
    mpp: float | None
    downsamples: list[float]


class QuPathStatus(BaseModel):
    """What ``wsi-llava qupath status`` reports."""

    model_config = ConfigDict(extra="forbid")

    port: int
    extension_version: str | None
    image: ImageInfo | None
    n_annotations: int = 0
    n_selected: int = 0


class QuPathAnnotation:
    """A QuPath annotation: the live Java object and its Region (read from QuPath's own GeoJSON)."""

    def __init__(self, java_object: Any, region: Region) -> None:
        self.java_object = java_object
        self.region = region

    @property
    def label(self) -> str:
        return self.region.name or self.region.id or "annotation"


_DRIVE = re.compile(r"^/([A-Za-z])[:|](?=/|$)")


def uri_to_path(uri: str) -> str | None:
    """The path a ``file:`` URI names, or None for another scheme (e.g. an OMERO or HTTP image server).

    Java writes Windows files as ``file:/C:/My%20slides/a.svs`` or ``file:///C:/...``: both give
    ``C:/My slides/a.svs`` (not ``/C:/...``). A host other than ``localhost`` is a UNC share (``//host/...``).
    """
    parsed = urlparse(uri)
    if parsed.scheme.lower() != "file":
        return None
    path = unquote(parsed.path)
    if parsed.netloc and parsed.netloc.lower() != "localhost":
        return f"//{parsed.netloc}{path}"
    drive = _DRIVE.match(path)
    if drive:
        return f"{drive.group(1)}:{path[drive.end() :] or '/'}"
    return path


def _local_path(uri: str) -> Path | None:
    """The local file behind a ``file:`` URI if it exists on this machine."""
    path = uri_to_path(uri)
    if path is None:
        return None
    local = Path(path)
    return local if local.is_file() else None


def within(seconds: float, what: str, fn: Callable[[], T]) -> T:
    """``fn()`` with a total deadline: a ``QuPathError`` naming ``what`` when it has not returned in time.

    py4j waits for each reply without a limit; ``fn`` runs in a daemon thread left behind on time-out
    (it ends when the socket closes, or with the process).
    """
    done: dict[str, Any] = {}

    def work() -> None:
        try:
            done["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            done["error"] = e

    worker = threading.Thread(target=work, name=f"qupath: {what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise QuPathError(
            f"{what}: no answer within {seconds:g} s. Is this port QuPath's Py4J gateway, and is QuPath "
            "responsive (no open dialog, no long command running)?"
        )
    if "error" in done:
        raise done["error"]
    return done["value"]


class _Py4JRootNoise(logging.Filter):
    """py4j logs failed sends on the *root* logger, traceback included; the bridge reports each failure
    as one ``QuPathError``, so those records show only at debug level (``-vv``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root" and f"{os.sep}py4j{os.sep}" in record.pathname:
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def _quiet_py4j_root_logs() -> None:
    root = logging.getLogger()
    if not any(isinstance(f, _Py4JRootNoise) for f in root.filters):
        root.addFilter(_Py4JRootNoise())


class _NoReply(TimeoutError):
    """A call's reply did not come within the gateway's read timeout (its connection is closed)."""


def _open_gateway(port: int, token: str | None, call_timeout: float) -> Any:
    """A py4j gateway to ``port`` (as qubalab's ``create_gateway`` makes it) whose calls wait at most
    ``call_timeout`` seconds for a reply, then raise :class:`_NoReply`; checked with ``getQuPath()``."""
    from py4j.java_gateway import GatewayClient, GatewayConnection, GatewayParameters, JavaGateway
    from py4j.protocol import Py4JNetworkError

    class Connection(GatewayConnection):
        def send_command(self, command: str) -> str:
            try:
                return super().send_command(command)
            except Py4JNetworkError as e:
                if not isinstance(e.cause, TimeoutError):
                    raise
                self.close(True)  # py4j would give this connection back, its late reply still to come
                raise _NoReply() from None

    class Client(GatewayClient):
        def _create_connection(self) -> GatewayConnection:
            connection = Connection(self.gateway_parameters, self.gateway_property)
            connection.start()
            return connection

    class Gateway(JavaGateway):
        def _create_gateway_client(self) -> GatewayClient:
            return Client(gateway_parameters=self.gateway_parameters)

    params = GatewayParameters(port=port, auth_token=token, read_timeout=call_timeout)
    gateway = Gateway(gateway_parameters=params)
    try:
        if gateway.entry_point.getQuPath() is None:
            raise RuntimeError("the entry point has no QuPath")
    except BaseException:
        gateway.close()
        raise
    return gateway


def connect(
    port: int = DEFAULT_PORT,
    token: str | None = None,
    timeout: float = CONNECT_TIMEOUT,
    call_timeout: float = CALL_TIMEOUT,
) -> QuPathBridge:
    """Connect to QuPath's py4j gateway; a clear ``QuPathError`` when nothing listens or answers.

    ``timeout`` bounds the handshake; ``call_timeout`` each later call's wait for its reply (reading
    pixels may take long, a QuPath that stops answering must not hang the caller).
    """
    _quiet_py4j_root_logs()
    if not 0 < port < 65536:
        raise QuPathError(f"--port {port}: expected a TCP port number (QuPath's default is {DEFAULT_PORT})")

    def handshake() -> Any:
        py4j_logger = logging.getLogger("py4j")
        level = py4j_logger.level
        py4j_logger.setLevel(
            logging.CRITICAL
        )  # py4j logs a traceback for a refused connection; we say it once
        try:
            return _open_gateway(port, token, call_timeout)
        except Exception as e:  # Py4JNetworkError when nothing listens, Py4JError on a wrong token
            raise QuPathError(
                f"cannot connect to QuPath on port {port}: is QuPath running with its Python gateway started "
                "(Extensions > Py4J > Start Py4J Gateway), on this port"
                + (" and with this token" if token else "")
                + f"? ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        finally:
            py4j_logger.setLevel(level)

    gateway = within(timeout, f"connecting to QuPath on port {port}", handshake)
    return QuPathBridge(gateway, port, call_timeout)


def status_within(port: int, token: str | None, timeout: float) -> QuPathStatus:
    """Connect, read what ``qupath status`` shows and disconnect, all within ``timeout`` seconds."""
    import py4j.java_gateway  # noqa: F401 - imported before the clock starts

    def read() -> QuPathStatus:
        bridge = connect(port, token, timeout=timeout, call_timeout=timeout)
        try:
            return bridge.status()
        finally:
            bridge.close()

    return within(timeout, f"QuPath on port {port}", read)


class QuPathBridge:
    """One connection to QuPath; every call goes through ``gateway.entry_point``."""

    def __init__(self, gateway: Any, port: int = DEFAULT_PORT, call_timeout: float = CALL_TIMEOUT) -> None:
        self.gateway = gateway
        self.port = port
        self.host = str(getattr(getattr(gateway, "gateway_parameters", None), "address", "127.0.0.1"))
        self.call_timeout = call_timeout
        self.ep = gateway.entry_point
        self._stalled: str | None = None  # the error of a call QuPath did not answer: every later call's too

    def _call(self, what: str, fn, *args):
        with self._replies(what):
            return fn(*args)

    @contextlib.contextmanager
    def _replies(self, what: str) -> Iterator[None]:
        """Turn whatever py4j or a reply's conversion raises into one ``QuPathError`` naming ``what``.

        A peer on the port that is not QuPath's gateway (or a broken one) sends garbage: py4j then
        fails to decode it, or returns objects of the wrong kind that fail when converted here.
        """
        from py4j.protocol import Py4JError, Py4JNetworkError

        if self._stalled is not None:
            raise QuPathError(self._stalled)
        try:
            yield
        except WsiLlavaError:
            raise
        except _NoReply:
            self._stalled = (
                f"QuPath at {self.host}:{self.port} did not answer {what} within {self.call_timeout:g} s: is "
                "QuPath busy (an open dialog, a long command)? Try again once it responds, or give --timeout "
                "more seconds"
            )
            # no more calls through this connection, nor releases of Java objects, to a peer that stalled
            self.gateway._gateway_client.is_connected = False
            raise QuPathError(self._stalled) from None
        except Py4JNetworkError as e:
            raise QuPathError(
                f"lost the connection to QuPath on port {self.port} during {what} ({_first_line(e)}): "
                "is this port QuPath's Py4J gateway?"
            ) from None
        except Py4JError as e:
            raise QuPathError(f"QuPath at {self.host}:{self.port} refused {what}: {_first_line(e)}") from None
        except (TypeError, ValueError, AttributeError, LookupError, OSError) as e:
            raise QuPathError(
                f"unexpected reply from port {self.port} to {what} ({type(e).__name__}: {_first_line(e)}): "
                "is this port QuPath's Py4J gateway?"
            ) from None

    # --- image ---------------------------------------------------------------------------------
    def image_data(self) -> Any:
        data = self._call("getCurrentImageData", self.ep.getCurrentImageData)
        if data is None:
            raise QuPathError("no image is open in QuPath: open the slide, then run the command again")
        return data

    def server(self) -> Any:
        return self._call("getServer", self.image_data().getServer)

    def image_info(self) -> ImageInfo:
        server = self.server()
        with self._replies("the image's metadata (getURIs, getPixelCalibration, nResolutions...)"):
            uris = [str(u.toString()) for u in server.getURIs()]
            local = next((p for p in (_local_path(u) for u in uris) if p is not None), None)
            mpp = float(server.getPixelCalibration().getAveragedPixelSizeMicrons())
            n = int(server.nResolutions())
            return ImageInfo(
                server_path=str(server.getPath()),
                uris=uris,
                local_path=local,
                width=int(server.getWidth()),
                height=int(server.getHeight()),
                mpp=mpp if math.isfinite(mpp) and mpp > 0 else None,
                downsamples=[float(server.getDownsampleForResolution(i)) for i in range(n)],
            )

    def read_pixels(self, x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
        """RGB pixels of a level-0 window, downsampled by QuPath (PNG over the gateway)."""
        from PIL import Image

        server = self.server()
        with self._replies("getImageBase64 (the pixels of a region)"):
            text = self.ep.getImageBase64(
                server, float(downsample), int(x), int(y), int(width), int(height), "png"
            )
            return np.asarray(Image.open(BytesIO(base64.b64decode(str(text)))).convert("RGB"))

    # --- objects -------------------------------------------------------------------------------
    def annotations(self, selected: bool) -> list[QuPathAnnotation]:
        """The selected (or all) annotations with polygon ROIs; points/lines are skipped with a message."""
        data = self.image_data()
        with self._replies("the annotations (getHierarchy, toGeoJsonFeatureList)"):
            hierarchy = data.getHierarchy()
            if selected:
                objs = [o for o in hierarchy.getSelectionModel().getSelectedObjects() if o.isAnnotation()]
            else:
                objs = list(hierarchy.getAnnotationObjects())
            if not objs:
                return []
            # the gateway is made without py4j's auto_convert (as qubalab's create_gateway makes it): a Java list
            java_objs = self.gateway.jvm.java.util.ArrayList()
            for o in objs:
                java_objs.add(o)
            features = self.ep.toGeoJsonFeatureList(java_objs)
            kept_objs, kept_features = [], []
            for obj, text in zip(objs, features, strict=True):
                feature = json.loads(str(text))
                gtype = (feature.get("geometry") or {}).get("type")
                label = (feature.get("properties") or {}).get("name") or feature.get("id")
                if gtype not in ("Polygon", "MultiPolygon"):
                    logger.warning("annotation %r is a %s, not an area: skipped", label, gtype)
                    continue
                kept_objs.append(obj)
                kept_features.append(feature)
        regions = _feature_regions(kept_features)
        return [QuPathAnnotation(o, r) for o, r in zip(kept_objs, regions, strict=True)]

    def write(self, annotation: QuPathAnnotation, update: AnnotationUpdate, overwrite: bool = False) -> None:
        """Write one answer into the live QuPath object: description, optional name, measurements."""
        self.prepare_write(annotation.java_object, annotation.region.properties, update, overwrite)()

    def prepare_write(
        self, obj: Any, properties: dict[str, Any], update: AnnotationUpdate, overwrite: bool = False
    ) -> Callable[[], None]:
        """Read and check all that writing ``update`` into ``obj`` needs, changing nothing; the call returned
        makes the changes. A caller with more to write (evidence tiles) does that in between, so that a
        failure there leaves no answer written without it.

        The new properties come from the core's :func:`apply_to_properties` (as for GeoJSON files) over
        ``properties`` (what was read from QuPath), with the description QuPath holds now. Measurements go
        back the way they were read: QuPath <= 0.3 exports a list of ``{name, value}`` and takes
        ``getMeasurementList().putMeasurement``, later versions an object and ``getMeasurements().put``.
        """
        props = dict(properties)
        metadata = props.get("metadata")
        props["metadata"] = {**(metadata if isinstance(metadata, dict) else {}), DESCRIPTION_KEY: None}
        live = self._call("getDescription", obj.getDescription)
        if live is not None:
            props["metadata"][DESCRIPTION_KEY] = str(live)
        new = apply_to_properties(props, update, overwrite)  # checks everything before the first change
        put = self._measurement_put(obj, legacy=isinstance(props.get("measurements"), list))

        def apply() -> None:
            self._call("setDescription", obj.setDescription, new["metadata"][DESCRIPTION_KEY])
            if update.name is not None:
                self._call("setName", obj.setName, new["name"])
            for key, value in update.measurements.items():
                self._call("measurement put", put, key, float(value))

        return apply

    def _measurement_put(self, obj: Any, legacy: bool) -> Callable[[str, float], Any]:
        """The Java method that sets one measurement of ``obj``, for the QuPath version that made it."""
        from py4j.protocol import Py4JError

        if not legacy:
            try:
                return obj.getMeasurements().put
            except Py4JError:  # QuPath <= 0.3 has no getMeasurements(), and omits empty measurement lists
                logger.debug("no getMeasurements(): writing through the QuPath <= 0.3 measurement list")
        return self._call("getMeasurementList", obj.getMeasurementList).putMeasurement

    def add_annotation(self, feature: dict[str, Any]) -> Any:
        """Add a new object from a GeoJSON feature, as qubalab's ``add_objects`` does; the new Java object."""
        hierarchy = self._call("getHierarchy", self.image_data().getHierarchy)
        with self._replies("toPathObjects, addObjects (a new annotation)"):
            objs = self.ep.toPathObjects(json.dumps([feature], allow_nan=True))
            hierarchy.addObjects(objs)
            return objs[0]

    def _java_list(self, objs: list[Any]) -> Any:
        """A ``java.util.ArrayList`` of ``objs`` (qubalab's gateway does not convert Python lists)."""
        out = self.gateway.jvm.java.util.ArrayList()
        for o in objs:
            out.add(o)
        return out

    def evidence_children(self, parents: list[Any]) -> list[Any]:
        """The evidence detections (classified ``EVIDENCE_CLASS``) directly below each of ``parents``."""
        from wsi_llava.evidence_tiles import EVIDENCE_CLASS

        found = []
        with self._replies("the annotations' child objects (getChildObjects)"):
            for parent in parents:
                for child in self.gateway.jvm.java.util.ArrayList(parent.getChildObjects()):
                    if not child.isDetection():
                        continue
                    path_class = child.getPathClass()
                    if path_class is not None and str(path_class.toString()) == EVIDENCE_CLASS:
                        found.append(child)
        return found

    def put_detections(self, parent: Any, features: list[dict[str, Any]], replace: list[Any]) -> int:
        """Remove the objects ``replace``, then add ``features`` (GeoJSON detections) as children of
        ``parent``, as QuPath holds detections inside an annotation; how many were added.

        The caller redraws QuPath (:meth:`refresh`) once after its last change.
        """
        hierarchy = self._call("getHierarchy", self.image_data().getHierarchy)
        with self._replies("removeObjects, toPathObjects, addObjectBelowParent (evidence detections)"):
            if replace:
                hierarchy.removeObjects(self._java_list(replace), False)
            if not features:
                return 0
            objs = self.ep.toPathObjects(json.dumps(features, allow_nan=True))
            for obj in objs:
                hierarchy.addObjectBelowParent(parent, obj, False)
            return len(features)

    def refresh(self) -> None:
        """Let QuPath redraw and update its panes (qubalab ``refresh_qupath``)."""
        from qubalab.qupath.qupath_gateway import refresh_qupath

        self._call("fireHierarchyUpdate", refresh_qupath, self.gateway)

    def extension_version(self) -> str | None:
        try:
            return self._call("getExtensionVersion", lambda: str(self.ep.getExtensionVersion()))
        except QuPathError:
            if self._stalled is not None:
                raise
            return None  # older py4j extensions lack it

    def status(self) -> QuPathStatus:
        info = None
        n_ann = n_sel = 0
        if self._call("getCurrentImageData", self.ep.getCurrentImageData) is not None:
            info = self.image_info()
            data = self.image_data()
            with self._replies("the annotation counts (getHierarchy)"):
                hierarchy = data.getHierarchy()
                n_ann = len(list(hierarchy.getAnnotationObjects()))
                n_sel = sum(1 for o in hierarchy.getSelectionModel().getSelectedObjects() if o.isAnnotation())
        return QuPathStatus(
            port=self.port,
            extension_version=self.extension_version(),
            image=info,
            n_annotations=n_ann,
            n_selected=n_sel,
        )

    def close(self) -> None:
        """Close this connection (QuPath's gateway keeps running); later calls through it fail."""
        from wsi_llava_qupath import reader

        if reader._LIVE.get(self.port) is self:
            del reader._LIVE[self.port]
        try:
            self.gateway.close()
        except Exception:  # noqa: BLE001
            logger.debug("closing the py4j gateway failed", exc_info=True)
        # no reconnecting later just to release Java objects garbage-collected on this side
        self.gateway._gateway_client.is_connected = False


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _feature_regions(features: list[dict[str, Any]]) -> list[Region]:
    """Regions from QuPath's features, through the core's GeoJSON reader (the same rules as for files)."""
    import tempfile

    from wsi_llava.slide.geojson import read_geojson

    if not features:
        return []
    with tempfile.TemporaryDirectory(prefix="wsi-llava-qupath-") as d:
        p = Path(d) / "annotations.geojson"
        p.write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")
        try:
            return read_geojson(p)
        except AnnotationError as e:
            raise AnnotationError(str(e).replace(str(p), "QuPath annotations")) from None


__all__ = [
    "CALL_TIMEOUT",
    "CONNECT_TIMEOUT",
    "DEFAULT_PORT",
    "ImageInfo",
    "QuPathAnnotation",
    "QuPathBridge",
    "QuPathError",
    "QuPathStatus",
    "connect",
    "status_within",
    "uri_to_path",
    "within",
]

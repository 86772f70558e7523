"""``wsi-llava serve``: one model server for many napari, QuPath and CLI users (FastAPI + uvicorn, ``/v1``)."""

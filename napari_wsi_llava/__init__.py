"""napari frontend of wsi-llava: reader, dock widget, sample data and GeoJSON writer (npe2 plugin)."""

"""QuPath bridge of wsi-llava: qubalab over QuPath's py4j gateway (a plugin of the core)."""

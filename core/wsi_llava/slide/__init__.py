"""Slides: readers behind one ``SlideReader`` contract, regions, tissue detection, tiling, GeoJSON."""

from wsi_llava.slide.base import BaseSlideReader, SlideReader
from wsi_llava.slide.open import open_slide
from wsi_llava.slide.region import Region

__all__ = ["BaseSlideReader", "Region", "SlideReader", "open_slide"]

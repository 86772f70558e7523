"""Default judge prompt texts (our own wording of the published WSI-Precision / WSI-Relevance protocol)."""

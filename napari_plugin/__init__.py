"""napari plugin for islet-imaging (thin widgets over the library)."""

"""Qt docks for napari. The only package that imports Qt, napari and magicgui."""

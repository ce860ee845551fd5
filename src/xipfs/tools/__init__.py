"""Tools over whole trees: ``pack`` (a directory tree into an image, laid out whole) and
``unpack`` (an image into a directory tree, safely)."""

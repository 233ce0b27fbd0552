"""Image and video processing: decode, orient, resize, encode, frames."""

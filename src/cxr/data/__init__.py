"""Data stages: download (sources), grayscale (gray), split; store is their on-disk format."""

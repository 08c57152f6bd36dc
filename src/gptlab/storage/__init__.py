"""Storage: atomic files and run locks, safe loading of untrusted files, one downloader and one cache home."""
